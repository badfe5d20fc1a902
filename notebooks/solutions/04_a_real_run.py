"""Solutions to the exercises of notebook 04 (a real run); see solutions/01 for the format."""
# %% exercise 1
by_name = {s["name"]: s for s in report["systems"]}
gap = by_name["dense"]["loss"] - by_name["ensemble/oracle"]["loss"]

# %% exercise 2
mix, _, valid = model.token_log_probs(texts)
scores_by_hand = -np.where(valid, mix, 0.0).sum(axis=1) / valid.sum(axis=1)

# %% exercise 3
broken_tokens = sum("\ufffd" in tok.decode([i]) for i in tok.encode("日本語", add_special_tokens=False))
