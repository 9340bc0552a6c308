"""`genkit bench`: genkit's engine against plain transformers, side by side in one run."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from genkit.cli import options as o
from genkit.models import LoadOptions


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


@o.model_options
def bench(
    model: o.Model = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens generated per scenario.")] = 64,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Alternating rounds; the best counts.")] = 3,
    only: Annotated[Optional[str], typer.Option(
        "--only", show_default=False, help="Comma-separated scenarios (default: all): greedy-b1, sampling-b1, greedy-b8, beam4, prompt-lookup, "
        "assisted, dola, contrastive.")] = None,
    assistant_model: Annotated[Optional[str], typer.Option(
        "--assistant-model", show_default=False, help="Draft model: adds 'assisted' (default: none).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per scenario.")] = False,
    load: LoadOptions = None,
) -> None:
    """Tokens/s, time to first token and memory of genkit and plain transformers generate()."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from genkit import bench as B
    from genkit import models

    names = [s.strip() for s in only.split(",") if s.strip()] if only else None
    B.check_names(names or [], assistant_model is not None)
    lm = o.load_model(model, load)
    reference = None
    if load.native_4bit or load.native_8bit or lm.info.get("mode") == "gguf-native":
        # transformers cannot run genkit's blocks (a GGUF file's, or its 4-bit / 8-bit ones): its
        # baseline is the same model in fp32, a .gguf dequantised.
        reference = o.load_model(model, LoadOptions(threads=load.threads, dequantize=True))
    assistant = o.load_model(assistant_model, LoadOptions(dtype=load.dtype, device_map=load.device_map,
                                                          threads=load.threads)) if assistant_model else None
    err = Console(stderr=True)
    with err.status("benchmarking…") as status:
        rows = B.bench(lm, new_tokens=new_tokens, rounds=rounds, assistant=assistant, only=names,
                       reference=reference, progress=lambda n: status.update(f"benchmarking {n}…"))
    llama = None
    on_gguf = load.native_4bit or lm.info.get("mode", "").startswith("gguf-native")
    if on_gguf and (names is None or "greedy-b1" in names):
        gguf = model or str(models.default_gguf_path())
        with err.status("benchmarking llama.cpp…"):
            llama = B.versus_llama_cpp(lm, gguf, new_tokens=new_tokens, rounds=rounds)
    llama_line = _llama_summary(llama)
    device = str(lm.device) if lm.device.type != "cuda" else torch.cuda.get_device_name(lm.device)
    header = {"model": lm.name, "device": device, "threads": torch.get_num_threads(), "dtype": str(getattr(lm.model, "dtype", "")),
              "native_4bit": load.native_4bit, "native_8bit": load.native_8bit,
              "int8_activations": load.int8_activations, "new_tokens": new_tokens, "rounds": rounds}
    if json_out:
        for r in rows:
            print(json.dumps({**header, "scenario": r.scenario, "genkit_tokens_per_s": round(r.genkit_tps, 2),
                              "transformers_tokens_per_s": None if r.transformers_tps is None else round(r.transformers_tps, 2),
                              "ratio": None if r.ratio is None else round(r.ratio, 3),
                              "genkit_ttft_s": r.genkit_ttft, "transformers_ttft_s": r.transformers_ttft,
                              "memory_mb": round(r.memory_mb, 1), "same_tokens": r.same_tokens, **r.extra}))
        if on_gguf:
            print(json.dumps({**header, "scenario": "llama.cpp greedy-b1", **llama_line}))
        return
    table = Table(title=f"genkit bench · {lm.name} · {device} · {torch.get_num_threads()} threads · "
                        f"{new_tokens} new tokens", header_style="bold")
    for col in ("scenario", "tf tok/s", "genkit tok/s", "ratio", "TTFT tf", "TTFT genkit", "MB", "same", "note"):
        table.add_column(col, justify="left" if col in ("scenario", "note", "same") else "right")
    fmt = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
    for r in rows:
        table.add_row(r.scenario, fmt(r.transformers_tps), fmt(r.genkit_tps), fmt(r.ratio, 2) + ("x" if r.ratio else ""),
                      fmt(r.transformers_ttft, 3), fmt(r.genkit_ttft, 3), fmt(r.memory_mb, 0),
                      {True: "yes", False: "NO", None: "-"}[r.same_tokens], r.note)
    console = Console(highlight=False, width=max(120, Console().width))
    console.print(table)
    if on_gguf:
        # the terminal's own width: the table's console is at least 120 wide and would break words
        Console(highlight=False).print("llama.cpp greedy-b1: " + llama_line["note"], markup=False)


def _llama_summary(v) -> dict:
    """llama.cpp beside genkit's greedy-b1 on the same GGUF: speeds, first tokens, agreement."""
    if v is None:
        return {"tokens_per_s": None, "note": "llama-cpp-python not installed (pip install 'genkit[bench]')"}
    return {"tokens_per_s": round(v.llama_tps, 2), "ttft_s": round(v.llama_ttft, 4),
            "genkit_tokens_per_s": round(v.genkit_tps, 2), "genkit_ttft_s": round(v.genkit_ttft, 4),
            "genkit_vs_llama_cpp": round(v.ratio, 3), "same_leading_tokens": v.same_leading_tokens,
            "note": f"{v.llama_tps:.1f} tok/s, TTFT {v.llama_ttft:.3f} s; genkit {v.genkit_tps:.1f} tok/s, "
                    f"TTFT {v.genkit_ttft:.3f} s (alternating rounds): genkit {v.ratio:.2f}x llama.cpp; "
                    f"same ids for {v.same_leading_tokens} of {v.new_tokens} tokens"}
