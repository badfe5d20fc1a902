"""Solutions to the exercises of notebook 01 (AR is a schedule).

Each block below ``# %% exercise N`` replaces the answer cell of exercise N when tests/test_notebooks.py runs the
notebook; it runs in the notebook's namespace (``np``, ``schedules``, ``q``, ``kl_to_q``, ... are defined there).
"""
# %% exercise 1
perm = [2, 0, 1]
kappa_any = np.zeros((4, 3))
for s, i in enumerate(perm):
    kappa_any[s + 1:, i] = 1.0          # position perm[s] is revealed at step s + 1 and stays revealed

# %% exercise 2
kl_one_block = kl_to_q(schedules.block(LENGTH, LENGTH).kappa)

# %% exercise 3
with jax.enable_x64(True):
    k16 = np.asarray(schedules.discretize(schedules.CosineScheduler(), LENGTH, 16).kappa, np.float64)[:, 0]
a = np.diff(k16)                         # a_s = kappa(t_(s+1)) - kappa(t_s), sums to 1
eps = 3 * np.sum(a**2) - 2 * np.sum(a**3)   # 1 - P(three independent steps all different)
