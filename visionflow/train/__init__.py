"""Training: the engine, its records, optimizers, random streams, stopping, devices and their limits,
fast-setting autotuning, and data-parallel launch (torchrun) with its worker."""
