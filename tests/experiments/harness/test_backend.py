"""The harness-free helpers of experiments/harness/backend.py (no harness needed; the request
numbers are checked through each harness's CLI in test_lm_eval_model.py / test_lmms_eval_model.py)."""
from types import SimpleNamespace

import numpy as np
import pytest

from experiments.harness.backend import Backend, cut_at, pil_to_uint8, split_pair


def test_split_pair_moves_trailing_whitespace_to_the_continuation():
    assert split_pair("Question: 2+2=", "4") == ("Question: 2+2=", "4")
    assert split_pair("The answer is ", "four") == ("The answer is", " four")
    assert split_pair("a\n\n", "b") == ("a", "\n\nb")
    assert split_pair("", " x") == ("", " x")


def test_cut_at_the_first_stop_string():
    assert cut_at("abc. def\nghi", [".", "\n"]) == "abc"
    assert cut_at("abc\ndef. ghi", [".", "\n"]) == "abc"
    assert cut_at("abc", ["x", ""]) == "abc"
    assert cut_at("abc", []) == "abc"


def test_pil_to_uint8_crops_the_centre_square_and_resizes():
    from PIL import Image

    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pil_to_uint8(Image.fromarray(square), 16), square)     # unchanged
    np.testing.assert_array_equal(pil_to_uint8(square, 16), square)
    wide = np.zeros((16, 40, 3), np.uint8)
    wide[:, 12:28] = square                                   # the central 16 x 16 square of a wide image
    np.testing.assert_array_equal(pil_to_uint8(wide, 16), square)
    grey = Image.fromarray(square[..., 0], mode="L")
    assert pil_to_uint8(grey, 8).shape == (8, 8, 3)
    rgba = Image.fromarray(np.dstack([square, np.full((16, 16), 255, np.uint8)]), mode="RGBA")
    np.testing.assert_array_equal(pil_to_uint8(rgba, 16), square)


def test_backend_arguments_are_checked():
    stub = SimpleNamespace(context_length=32, tokenizer=None)
    assert Backend(stub).max_length == 32 and Backend(stub, max_length=8).max_length == 8
    with pytest.raises(ValueError, match="routing: expected 'context' or 'text'"):
        Backend(stub, routing="oracle")
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
            Backend(stub, batch_size=bad)
