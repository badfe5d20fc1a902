"""Preemption: a signal during `train` checkpoints the next step boundary, raises `Preempted`, and
the resumed run equals an uninterrupted one."""
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dfm.models import DecoderConfig
from dfm.train import Preempted, TrainConfig, train
from dfm.train.preemption import PreemptionFlag, preemption_signals
from tiny_models import assert_same_run, lm_loss, tiny_decoder

CONFIG = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                       num_kv_heads=2)
DATA = jax.random.randint(jax.random.key(0), (4, 12), 0, 50, dtype=jnp.int32)
# the optimizer setting of test_loop's RESUME_CONFIG: one compiled step for both files
TRAIN = TrainConfig(steps=10, learning_rate=5e-3, warmup_steps=2, log_every=2, checkpoint_every=4,
                    weight_decay=0.1, seed=7)


def batches(step):
    return jnp.roll(DATA, step % 3, axis=0)


def signalling(sig, at_step):
    """`batches`, sending `sig` to this process while the batch of `at_step` is drawn."""
    def batch_fn(step):
        if step == at_step:
            os.kill(os.getpid(), sig)
        return batches(step)
    return batch_fn


def params(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def saved_steps(path):
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_checkpoints_the_next_step_and_the_resume_is_exact(tmp_path, sig):
    straight = train(tiny_decoder(CONFIG, 0), lm_loss, batches, TRAIN, progress=False)
    ckpt = tmp_path / "run"
    before = signal.getsignal(sig)
    with pytest.raises(Preempted) as caught:
        train(tiny_decoder(CONFIG, 0), lm_loss, signalling(sig, 5), TRAIN, checkpoint_dir=ckpt, progress=False)
    exc = caught.value
    assert (exc.desc, exc.step, exc.signal) == ("train", 6, sig.name)     # step 5 finished: 6 steps done
    assert exc.checkpoint == ckpt.absolute() and saved_steps(ckpt) == [4, 6]
    assert str(exc) == f"train: {sig.name} received; checkpointed at step 6 in {ckpt.absolute()}"
    assert signal.getsignal(sig) == before                                # handlers restored
    resumed = train(tiny_decoder(CONFIG, 1), lm_loss, batches, TRAIN, checkpoint_dir=ckpt, progress=False)
    assert resumed.steps_done == 10 and saved_steps(ckpt) == [8, 10]
    for a, b in zip(params(resumed.model), params(straight.model), strict=True):
        assert_same_run(np.asarray(a), np.asarray(b))
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]


def test_a_signal_at_the_last_step_still_stops_with_the_finished_checkpoint(tmp_path):
    """The signal is honoured (the job is about to be killed) even when the run is complete: the
    checkpoint holds every step, so the re-run returns at once."""
    ckpt = tmp_path / "run"
    with pytest.raises(Preempted) as caught:
        train(tiny_decoder(CONFIG, 0), lm_loss, signalling(signal.SIGTERM, 9), TRAIN, checkpoint_dir=ckpt,
              progress=False)
    assert caught.value.step == 10 and saved_steps(ckpt) == [8, 10]
    assert train(tiny_decoder(CONFIG, 0), lm_loss, batches, TRAIN, checkpoint_dir=ckpt,
                 progress=False).steps_done == 10


def test_handlers_only_replace_the_default_and_only_in_the_main_thread():
    seen = []
    mine = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with preemption_signals() as flag:
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL     # taken over
            os.kill(os.getpid(), signal.SIGUSR1)                           # the application's handler
            assert seen == [signal.SIGUSR1] and not flag.requested
            with preemption_signals() as inner:                            # nested: the same flag
                assert inner is flag
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.signal == "SIGTERM"
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, mine)
    flags = []

    def other_thread():
        with preemption_signals() as flag:
            flags.append(flag)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert isinstance(flags[0], PreemptionFlag) and not flags[0].requested
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
