"""Modal app: the DFlash benchmark on one H100 with bf16 openai/gpt-oss-20b.

It only wraps the library's ``benchmark_snapshot`` (the same code the local CLI
runs); Harmony-formatted chat prompts come from the gpt-oss tokenizer's template.
Volumes: ``gptoss-weights`` caches the Hugging Face snapshot, ``dflash-drafts``
holds exported draft folders (``config.json`` + ``model.safetensors``).

  modal run modal/dflash_gptoss20b_benchmark.py --draft oracle
  modal volume put dflash-drafts ./exported_draft /my-draft
  modal run modal/dflash_gptoss20b_benchmark.py --draft /drafts/my-draft --max-new-tokens 256
  modal run modal/dflash_gptoss20b_benchmark.py --draft /drafts/my-draft --max-new-tokens 2048 --repeats 3
  modal run modal/dflash_gptoss20b_benchmark.py --draft /drafts/my-draft --temperature 1.0 --draft-sample sample

The JSON and PNG land in --out-dir (default artifacts/dflash_bench/) on the machine that ran
``modal run``; that folder is checked writable before the GPU is asked for. --repeats defaults
to the benchmark's choice for CUDA (``DEFAULT_REPEATS``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import modal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL_ID = "openai/gpt-oss-20b"
WEIGHTS_DIR = "/weights"
DRAFTS_DIR = "/drafts"

image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(
        "torch>=2.6", "transformers~=5.5.0", "safetensors>=0.4.5", "huggingface_hub>=1.0", "tokenizers>=0.22",
        "matplotlib>=3.8", "tqdm>=4.66", "numpy>=1.26", "ml_dtypes>=0.4", "accelerate>=1.0",
    )
    .add_local_python_source("dflash_gptoss")
)
weights = modal.Volume.from_name("gptoss-weights", create_if_missing=True)
drafts = modal.Volume.from_name("dflash-drafts", create_if_missing=True)
app = modal.App("dflash-gptoss20b-benchmark")


@app.function(gpu="H100", image=image, volumes={WEIGHTS_DIR: weights, DRAFTS_DIR: drafts}, timeout=3 * 3600)
def benchmark(draft: str = "oracle", max_new_tokens: int = 256, block_size: int = 8, num_prompts: int = 8,
              prompts_jsonl: str | None = None, repeats: int | None = None, temperature: float = 0.0,
              top_p: float | None = None, draft_sample: str = "greedy", seed: int = 0) -> dict:
    """Download (once) the snapshot into the weights volume, then run the shared benchmark on the GPU."""
    import tempfile

    from huggingface_hub import snapshot_download

    from dflash_gptoss.benchmark.core import BenchSettings, benchmark_snapshot

    snapshot = snapshot_download(MODEL_ID, cache_dir=WEIGHTS_DIR)
    weights.commit()
    prompts_file = None
    if prompts_jsonl:
        prompts_file = Path(tempfile.mkdtemp()) / "prompts.jsonl"
        prompts_file.write_text(prompts_jsonl)
    settings = BenchSettings(max_new_tokens=max_new_tokens, block_size=block_size, draft=draft, repeats=repeats,
                             temperature=temperature, top_p=top_p, draft_sample=draft_sample, seed=seed)
    report = benchmark_snapshot(snapshot, settings, prompts_file=str(prompts_file) if prompts_file else None,
                                num_prompts=num_prompts, chat=True, device="cuda", dtype="bfloat16")
    report["teacher"] = f"{MODEL_ID} (bf16)"
    return report


@app.local_entrypoint()
def main(draft: str = "oracle", max_new_tokens: int = 256, block_size: int = 8, num_prompts: int = 8,
         prompts_file: str = "", repeats: int | None = None, out_dir: str = str(REPO / "artifacts" / "dflash_bench"),
         report_name: str | None = None, temperature: float = 0.0, top_p: float | None = None,
         draft_sample: str = "greedy", seed: int = 0) -> None:
    from dflash_gptoss.benchmark.core import BenchSettings, prepare_outputs, summary_lines, write_report

    # Everything that can be refused here is refused before a GPU is paid for (the draft path is on the volume).
    try:
        # The draft's own checks need the volume; the oracle stands in, except for the one rule about the oracle.
        BenchSettings(max_new_tokens=max_new_tokens, block_size=block_size, draft=draft if draft == "oracle" else
                      "random", repeats=repeats, temperature=temperature, top_p=top_p,
                      draft_sample=draft_sample, seed=seed).validate()
        out, stem = prepare_outputs(out_dir, report_name)
        if prompts_file and not Path(prompts_file).is_file():
            raise ValueError(f"--prompts-file {prompts_file} does not exist.")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    text = Path(prompts_file).read_text() if prompts_file else None
    report = benchmark.remote(draft=draft, max_new_tokens=max_new_tokens, block_size=block_size,
                              num_prompts=num_prompts, prompts_jsonl=text, repeats=repeats, temperature=temperature,
                              top_p=top_p, draft_sample=draft_sample, seed=seed)
    json_path, png_path = write_report(report, out, stem=stem)
    print("\n".join(summary_lines(report)))
    print(f"wrote {json_path} and {png_path}")
