//! Noise schedulers, numerically matching diffusers' classes of the same names.
