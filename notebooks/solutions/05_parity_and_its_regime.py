"""Solutions to the exercises of notebook 05 (parity and its regime); see solutions/01 for the format."""
# %% exercise 1
deltas = np.array([p["delta"] for p in d["per_seed"]])
mean_delta = float(deltas.mean())

# %% exercise 2
import scipy.stats

n = deltas.size
half = scipy.stats.t.ppf(0.975, n - 1) * deltas.std(ddof=1) / np.sqrt(n)
ci_by_hand = [mean_delta - half, mean_delta + half]
