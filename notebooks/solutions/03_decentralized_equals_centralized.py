"""Solutions to the exercises of notebook 03 (decentralized experts); see solutions/01 for the format."""
# %% exercise 1
x = np.array([0, 1, 2, 0])
i = tabular.state_index(x[None], VOCAB, with_mask=False)[0]
post_x = w * experts_q[:, i]
post_x = post_x / post_x.sum()

# %% exercise 2
q_avail = (w[0] * experts_q[0] + w[2] * experts_q[2]) / (w[0] + w[2])

# %% exercise 3
r = np.array([0.5, 0.3, 0.2])
tv_top1 = 0.5 * np.abs(r @ np.eye(3) - np.eye(3)[0]).sum()
