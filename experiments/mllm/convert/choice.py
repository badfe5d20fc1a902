"""Multiple-choice benchmarks in their official layouts: ScienceQA (metric "mc": the option letter
the answer names, `experiments.mllm.scorers.extract_choice`, against the gold letter).

Returns ``(records, skipped)`` as `experiments.mllm.convert.vqa` does.
"""
from __future__ import annotations

from pathlib import Path

from experiments.mllm.convert.common import LETTER_ANSWER, Images, field, read_json, record, text_field

LETTERS = "ABCDE"   # = experiments.mllm.scorers.LETTERS (ScienceQA has at most 5 options)


def scienceqa_prompt(question: str, choices: list[str], hint: str = "") -> str:
    """The question as InternVL's ``eval/scienceqa/evaluate_scienceqa.py`` lays it out (without its
    final instruction, the converter's suffix): ``<hint>\\n`` when there is a hint, the question,
    then one ``<letter>. <option>`` line per option."""
    lines = [hint] if hint else []
    lines.append(question)
    lines += [f"{letter}. {text}" for letter, text in zip(LETTERS, choices)]
    return "\n".join(lines)


def scienceqa(images: Images, *, questions, splits=None, split: str | None = "test", task: str | None = None,
              suffix: str | None = None) -> tuple[list[dict], dict]:
    """ScienceQA -> records with "choices" and the gold letter as the reference answer.

    Files: ``problems.json`` (``{pid: {"question", "choices": [...], "answer": <index>, "hint",
    "image": "image.png" | null, "split", ...}}``) and, optionally, ``pid_splits.json``
    (``{"train": [pid, ...], "val": [...], "test": [...], "minival": [...], ...}``) to select the
    problems of `split` (default "test"; without it, problems whose own "split" is `split`); images
    ``<problem split>/<pid>/<image>`` in `images` (``scienceqa/images``).

    Text-only problems (``"image": null``, about half of ScienceQA) are left out and counted: the
    job needs exactly one image per record. Task ``scienceqa_<split>`` (the IMG subset).

    Returns:
      (records, {"text-only problems (no image)": n} when some were left out).

    Raises:
      ValueError: not this layout, an unknown split, more than 5 options, or an answer index out of
        range (file and problem id named).
    """
    path = Path(questions)
    problems = read_json(path, "ScienceQA problems")
    if not isinstance(problems, dict):
        raise ValueError(f"{path}: ScienceQA problems must be a JSON object {{pid: problem}}, "
                         f"got {type(problems).__name__}")
    split = split or "test"
    if splits is not None:
        spath = Path(splits)
        table = read_json(spath, "ScienceQA pid_splits")
        pids = [str(p) for p in field(table, split, list, f"{spath} (split {split!r})")]
        missing = [p for p in pids if p not in problems]
        if missing:
            raise ValueError(f"{spath}: split {split!r} names {len(missing)} problem(s) not in {path}, "
                             f"e.g. {missing[:3]}")
    else:
        pids = [pid for pid, p in problems.items() if isinstance(p, dict) and p.get("split") == split]
        if not pids:
            raise ValueError(f"{path}: no problem has \"split\": {split!r} (give --split train|val|test, or "
                             "--splits pid_splits.json for minival and the others)")
    task = task or f"scienceqa_{split}"
    out, text_only = [], 0
    for pid in pids:
        p = problems[pid]
        where = f"{path}: problem {pid!r}"
        choices = [str(c).strip() for c in field(p, "choices", list, where)]
        answer = field(p, "answer", int, where)
        if not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f"{where}: {len(choices)} choices; 2 to {len(LETTERS)} are supported")
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer index {answer} outside the {len(choices)} choices")
        if p.get("image") is None:
            text_only += 1
            continue
        image_name = text_field(p, "image", where)
        image = images.path(f"{text_field(p, 'split', where)}/{pid}/{image_name}", where)
        hint = p.get("hint") if isinstance(p.get("hint"), str) else ""
        prompt = scienceqa_prompt(text_field(p, "question", where), choices, hint.strip())
        out.append(record(f"{task}:{pid}", image, prompt, LETTERS[answer], task, "mc",
                          LETTER_ANSWER if suffix is None else suffix, choices=choices, question_id=pid))
    return out, ({"text-only problems (no image)": text_only} if text_only else {})
