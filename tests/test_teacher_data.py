"""Teacher-generated training text: it IS the teacher's greedy output, and a killed run resumes exactly."""

from __future__ import annotations

import json

import pytest

from dflash_gptoss.data_generation import TeacherDataError, _fingerprint, generate_teacher_data


@pytest.fixture(scope="module")
def prompts(tiny_teacher_dir):
    from transformers import AutoTokenizer

    from dflash_gptoss.data_corpus import split_prompts

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    same = split_prompts(tok, "train", 4, 24, seed=3)
    # Two shorter prompts in the same batch exercise the left padding.
    return same + [same[0][5:], same[1][11:]]


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_samples_are_prompt_plus_the_greedy_loop_output(tiny_teacher_dir, prompts, tmp_path):
    """Every sample equals what the benchmark's explicit greedy loop produces (exact tokens, float32)."""
    from dflash_gptoss.decoding import greedy_decode
    from dflash_gptoss.teacher_torch import TargetRunner, load_target

    out = tmp_path / "data.jsonl"
    generate_teacher_data(tiny_teacher_dir, out, prompts, max_new_tokens=40, batch_size=6, progress=False)
    rows = _lines(out)
    assert len(rows) == len(prompts)
    runner = TargetRunner(load_target(tiny_teacher_dir), [])
    for p, row in zip(prompts, rows, strict=True):
        assert row["prompt_len"] == len(p) and row["input_ids"][: len(p)] == list(p)
        expected = greedy_decode(runner, list(p), 40, eos_token_id=0).tokens
        expected = expected[: expected.index(0)] if 0 in expected else expected  # EOS is the builder's job
        assert row["input_ids"][len(p):] == expected


def test_killed_run_resumes_to_the_identical_file(tiny_teacher_dir, prompts, tmp_path):
    full = tmp_path / "full.jsonl"
    generate_teacher_data(tiny_teacher_dir, full, prompts, max_new_tokens=16, batch_size=2, progress=False)
    out = tmp_path / "out.jsonl"
    lines = full.read_bytes().split(b"\n")
    # What a kill leaves: two flushed samples and a torn third line, plus the settings stamp.
    (tmp_path / "out.jsonl.partial").write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:7])
    (tmp_path / "out.jsonl.partial.json").write_text(json.dumps(
        {"fingerprint": _fingerprint(tiny_teacher_dir, prompts, 16, "float32")}))
    with pytest.raises(TeacherDataError, match="--resume"):
        generate_teacher_data(tiny_teacher_dir, out, prompts, max_new_tokens=16, batch_size=2, progress=False)
    with pytest.raises(TeacherDataError, match="different settings"):
        generate_teacher_data(tiny_teacher_dir, out, prompts, max_new_tokens=17, batch_size=2, resume=True,
                              progress=False)
    summary = generate_teacher_data(tiny_teacher_dir, out, prompts, max_new_tokens=16, batch_size=2, resume=True,
                                    progress=False)
    assert summary["resumed_from"] == 2
    assert out.read_bytes() == full.read_bytes()
    assert not (tmp_path / "out.jsonl.partial").exists()
    with pytest.raises(TeacherDataError, match="--overwrite"):
        generate_teacher_data(tiny_teacher_dir, out, prompts, max_new_tokens=16, progress=False)
    # A finished file is reused by --resume with the same settings, refused with others.
    assert generate_teacher_data(tiny_teacher_dir, out, prompts, max_new_tokens=16, resume=True)["reused"]
    with pytest.raises(TeacherDataError, match="different settings"):
        generate_teacher_data(tiny_teacher_dir, out, prompts[:3], max_new_tokens=16, resume=True)
