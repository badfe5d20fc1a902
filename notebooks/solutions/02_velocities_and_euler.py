"""Solutions to the exercises of notebook 02 (velocities and the Euler sampler); see solutions/01 for the format."""
# %% exercise 1
u_single = np.zeros((3, 3))             # u[y, x]; states 0, 1, m = 2
u_single[1, 2] = 0.3                    # from the mask to x_1 = 1 with probability 0.3
u_single[2, 2] = -0.3                   # ... leaving the mask

# %% exercise 2
with jax.enable_x64(True):
    r = np.asarray(schedules.discretize(schedules.CosineScheduler(), 1, 64).rates(), np.float64)[:, 0]
    e = np.asarray(samplers.euler_rates(schedules.CosineScheduler(), 1, 64), np.float64)[:, 0]
max_diff, at_step = float(np.abs(r - e).max()), int(np.argmax(np.abs(r - e)))

# %% exercise 3
T = 64
h = 1.0 / T
t = np.arange(T) * h
d2_max = 0.5 * np.pi**2 * np.maximum(np.abs(np.cos(np.pi * t)), np.abs(np.cos(np.pi * (t + h))))
bound = h**2 * d2_max / (2 * np.cos(0.5 * np.pi * t) ** 2)     # 1 - kappa = cos^2(pi t / 2)
bound[-1] = 0.0
