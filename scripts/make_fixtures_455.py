"""Record transformers 4.55's token ids for the strategies transformers 5 dropped from its core.

genkit owns contrastive search, DoLa and diverse (group) beam search. People moving from
transformers 4.x expect the same output, so tests compare genkit's token ids with the ids that
transformers 4.55.4's `generate()` produced for the same weights and the same input ids. This
script records those ids as JSON fixtures in tests/fixtures/. It is run by hand, never in CI:

    python3 -m venv fixtures-env
    fixtures-env/bin/pip install torch==2.13.0 transformers==4.55.4 gguf safetensors sentencepiece
    fixtures-env/bin/python scripts/make_fixtures_455.py          # needs .venv (genkit) too
    fixtures-env/bin/python scripts/make_fixtures_455.py --only dola   # one file

How it gets identical models and inputs into 4.55:
- The script starts itself once more under genkit's own environment (.venv, transformers 5)
  with `--prepare DIR`. That half builds the tiny random models with the tests' own code
  (tests/conftest.py: `tiny_llama_config`, `_save_tiny`, so tests rebuild the same weights from
  a seed, and their configs, which may list more than one end token), records a hash of their weights, and tokenises the prompts exactly as genkit does
  (left padding, chat template), because what matters is the ids, not the tokenizer.
- The 4.55 half loads those weights, and the embedded SmolLM2 from genkit's converted cache
  directory. transformers 5 writes `rope_parameters` in config.json where 4.55 reads
  `rope_theta`, so each model is loaded from a copy whose config is rewritten for 4.55.
- Each case stores its input_ids and attention_mask; tests feed exactly those to genkit.
  Outputs are the new token ids of each returned row, cut after the first end token (4.55 pads
  finished rows; genkit stops them), so they compare directly with genkit's results.

Contrastive search on the tiny models: their padding token's embedding is zero (LlamaConfig's
padding_idx), so 4.55's final hidden state at a padding position is a zero vector, its cosine
similarity 0/0 = NaN, and NaN wins the max of the degeneration penalty for every candidate of a
left-padded row: such rows silently decode greedily. genkit masks padding out of the max
instead. Where this happens the case also stores `output_ids_alone`, 4.55's output for each row
run alone without padding, which is what a padded row should produce; tests compare with it.

Sampled DoLa rows: 4.55 draws from torch's global generator, genkit from one generator per
row. For a single prompt the draws coincide when the global generator is seeded with what
genkit derives for row 0 (`row_seed` below mirrors genkit.engine.core.row_generator).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GENKIT_PYTHON = ROOT / ".venv" / "bin" / "python"
EMBEDDED_CACHE = ROOT / ".genkit-home" / "cache" / "models" / "smollm2-135m-instruct"

# name -> (overrides of tests/conftest.py's tiny_llama_config, torch seed)
TINY_MODELS = {
    "tiny2-tied": ({}, 0),  # the tests' `tiny` fixture itself
    "tiny12-untied": ({"num_hidden_layers": 12, "tie_word_embeddings": False, "initializer_range": 0.1}, 1),
    "tiny12-tied": ({"num_hidden_layers": 12, "initializer_range": 0.1}, 2),
    # tiny2-tied's weights with a second end token, one its beams reach: 4.x's group beam search
    # stores the first end token in place of the one that ended a hypothesis
    "tiny2-eos2": ({"eos_token_id": [2, 1682]}, 0),
}

# name -> (prompts, raw text or chat template)
BATCHES = {
    "raw3": (["The capital of France is", "Once upon a time, in a land far away, there lived a", "Hi"], True),
    "raw2": (["The best way to learn a language is", "Water boils at"], True),
    "raw1": (["My favourite food is"], True),
    "chat2": (["What is the capital of France?", "Name three colors."], False),
    "chat1": (["Give me a short tip for writing."], False),
}

CONTRASTIVE = [
    ("embedded", "raw3", {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 24}),
    ("embedded", "chat2", {"penalty_alpha": 0.3, "top_k": 6, "max_new_tokens": 20}),
    ("tiny2-tied", "raw3", {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 16}),
    ("tiny2-tied", "raw2", {"penalty_alpha": 0.4, "top_k": 3, "repetition_penalty": 1.3, "max_new_tokens": 16}),
    ("tiny12-untied", "raw3", {"penalty_alpha": 0.6, "top_k": 4, "max_new_tokens": 12}),
]

DOLA = [
    ("embedded", "raw3", {"dola_layers": "high", "repetition_penalty": 1.2, "max_new_tokens": 20}),
    ("embedded", "chat2", {"dola_layers": "low", "repetition_penalty": 1.2, "max_new_tokens": 20}),
    ("embedded", "raw2", {"dola_layers": [18, 22, 26], "repetition_penalty": 1.2, "max_new_tokens": 16}),
    ("embedded", "raw1", {"dola_layers": "high", "max_new_tokens": 12}),
    ("embedded", "raw1", {"dola_layers": "high", "repetition_penalty": 1.2, "do_sample": True, "seed": 5,
                          "max_new_tokens": 16}),
    ("tiny2-tied", "raw3", {"dola_layers": "high", "repetition_penalty": 1.2, "max_new_tokens": 12}),
    ("tiny12-untied", "raw3", {"dola_layers": "low", "repetition_penalty": 1.2, "max_new_tokens": 12}),
    ("tiny12-untied", "raw2", {"dola_layers": "high", "repetition_penalty": 1.2, "max_new_tokens": 12}),
    ("tiny12-untied", "raw2", {"dola_layers": [0, 3, 7], "repetition_penalty": 1.2, "max_new_tokens": 12}),
    ("tiny12-tied", "raw3", {"dola_layers": "low", "repetition_penalty": 1.2, "max_new_tokens": 12}),
    ("tiny12-tied", "raw1", {"dola_layers": "low", "do_sample": True, "seed": 11, "max_new_tokens": 12}),
]

DIVERSE_BEAM = [
    ("embedded", "raw2", {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0,
                          "num_return_sequences": 2, "max_new_tokens": 16}),
    ("embedded", "chat1", {"num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 1.0,
                           "num_return_sequences": 3, "max_new_tokens": 16}),
    ("tiny2-tied", "raw3", {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0,
                            "num_return_sequences": 4, "max_new_tokens": 10}),
    ("tiny2-tied", "raw2", {"num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 1.0,
                            "num_return_sequences": 3, "length_penalty": 0.5, "max_new_tokens": 10}),
    ("tiny12-untied", "raw2", {"num_beams": 6, "num_beam_groups": 2, "diversity_penalty": 1.0,
                               "num_return_sequences": 2, "early_stopping": True, "max_new_tokens": 10}),
    ("tiny2-eos2", "raw3", {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0,
                            "num_return_sequences": 4, "early_stopping": True, "max_new_tokens": 10}),
    ("tiny2-eos2", "raw3", {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0,
                            "num_return_sequences": 4, "length_penalty": 0.0, "max_new_tokens": 10}),
]

EOS_ID = 2  # SmolLM2's <|im_end|>, also the tiny models' eos (unless their overrides list more) and pad
PAD_ID = 2


def row_seed(seed: int, k: int = 0) -> int:
    """The seed genkit gives return row k of a prompt seeded with `seed` (see core.row_generator)."""
    return (seed * 0x9E3779B1 + k) % (2**63 - 1)


def weights_sha256(model) -> str:
    """A hash of every weight, in name order, so tests can prove they rebuilt the same model."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ half 1: transformers 5


def prepare(out: Path) -> None:
    """Under genkit's .venv: save the tiny models and tokenise every batch; writes prepared.json."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    from conftest import _save_tiny, tiny_llama_config
    from transformers import AutoModelForCausalLM

    from genkit import models
    from helpers import encode

    tiny = {}
    for name, (overrides, seed) in TINY_MODELS.items():
        path = _save_tiny(out / name, tiny_llama_config(**overrides), EMBEDDED_CACHE, seed=seed)
        reloaded = AutoModelForCausalLM.from_pretrained(path)
        tiny[name] = {"path": str(path), "overrides": overrides, "seed": seed,
                      "weights_sha256": weights_sha256(reloaded)}
    lm = models.load(str(EMBEDDED_CACHE))
    batches = {}
    for name, (prompts, raw) in BATCHES.items():
        ids, mask = encode(lm, prompts, raw=raw)
        batches[name] = {"prompts": prompts, "raw": raw, "input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    (out / "prepared.json").write_text(json.dumps({"tiny": tiny, "batches": batches}))


# ------------------------------------------------------------------ half 2: transformers 4.55


def config_for_455(src: Path, dst: Path) -> Path:
    """A copy of a transformers 5 model directory that 4.55 reads (weights linked, not copied)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def load_455(src: Path, tmp: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config_for_455(src, tmp), torch_dtype=torch.float32)
    model.eval()
    return model


def check_weights(model, expected: str | None, name: str) -> None:
    if expected is not None and weights_sha256(model) != expected:
        raise SystemExit(f"{name}: 4.55 did not load the weights transformers 5 saved")


def cut_after_eos(row: list[int], eos: list[int]) -> list[int]:
    ends = [i for i, t in enumerate(row) if t in eos]
    return row[: ends[0] + 1] if ends else row


def generate_455(model, batch: dict, params: dict, eos: list[int]) -> list[list[int]]:
    import torch

    kwargs = dict(params)
    seed = kwargs.pop("seed", None)
    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    if seed is not None:
        if ids.shape[0] != 1:
            raise SystemExit("sampled cases take one prompt (see the module docstring)")
        torch.manual_seed(row_seed(seed))
    kwargs.setdefault("do_sample", False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD_ID,
                             **kwargs)
    return [cut_after_eos(r, eos) for r in out[:, ids.shape[1]:].tolist()]


def padding_states_vanish(model, batch: dict) -> bool:
    """True when the final hidden state is a zero vector at some padding position (see the
    module docstring: 4.55's contrastive search then turns padded rows greedy)."""
    import torch

    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return bool(((hidden.norm(dim=-1) == 0) & (mask == 0)).any())


def generate_alone(model, batch: dict, params: dict, eos: list[int]) -> list[list[int]]:
    """Each row on its own, its padding removed."""
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = [t for t, m in zip(ids, mask) if m]
        rows += generate_455(model, {"input_ids": [real], "attention_mask": [[1] * len(real)]}, params, eos)
    return rows


def record(kind: str, cases, prepared: dict, models: dict) -> dict:
    import torch
    import transformers

    out = {
        "about": f"token ids from transformers {transformers.__version__} generate() ({kind}), "
                 "made by scripts/make_fixtures_455.py; rows cut after the first eos",
        "torch": torch.__version__,
        "eos_token_id": EOS_ID,
        "models": {},
        "cases": [],
    }
    for model_name, batch_name, params in cases:
        eos = [EOS_ID]
        if model_name != "embedded":
            info = prepared["tiny"][model_name]
            out["models"][model_name] = {k: info[k] for k in ("overrides", "seed", "weights_sha256")}
            eos = info["overrides"].get("eos_token_id", eos)
        batch = prepared["batches"][batch_name]
        rows = generate_455(models[model_name], batch, params, eos)
        case = {
            "model": model_name, "batch": batch_name, "params": params,
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_ids": rows,
        }
        if "penalty_alpha" in params and padding_states_vanish(models[model_name], batch):
            case["output_ids_alone"] = generate_alone(models[model_name], batch, params, eos)
        out["cases"].append(case)
        print(f"{kind}: {model_name} {batch_name} {params} -> {[len(r) for r in rows]} tokens", flush=True)
    return out


def write(name: str, data: dict) -> None:
    """One case per line: small files whose diffs stay readable."""
    head = {k: v for k, v in data.items() if k != "cases"}
    text = json.dumps(head, indent=1)[:-2] + ',\n "cases": [\n'
    text += ",\n".join("  " + json.dumps(c) for c in data["cases"]) + "\n ]\n}\n"
    (FIXTURES / name).write_text(text)


FILES = [
    ("contrastive", "contrastive search", CONTRASTIVE),
    ("dola", "DoLa", DOLA),
    ("diverse_beam", "diverse beam search", DIVERSE_BEAM),
]


def main(only: str | None) -> None:
    import transformers

    if not transformers.__version__.startswith("4.55"):
        raise SystemExit(f"run this with transformers 4.55 (fixtures-env), not {transformers.__version__}")
    if not EMBEDDED_CACHE.is_dir():
        raise SystemExit(f"{EMBEDDED_CACHE} is missing: run `GENKIT_HOME=.genkit-home .venv/bin/genkit pull` first")
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([str(GENKIT_PYTHON), __file__, "--prepare", str(tmp / "tf5")], check=True)
        prepared = json.loads((tmp / "tf5" / "prepared.json").read_text())
        models = {"embedded": load_455(EMBEDDED_CACHE, tmp / "455" / "embedded")}
        for name, info in prepared["tiny"].items():
            models[name] = load_455(Path(info["path"]), tmp / "455" / name)
            check_weights(models[name], info["weights_sha256"], name)
        for name, kind, cases in FILES:
            if only in (None, name):
                write(f"{name}_455.json", record(kind, cases, prepared, models))
    shutil.rmtree(ROOT / "scripts" / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=[f[0] for f in FILES], help="write only this fixture file")
    parser.add_argument("--prepare", metavar="DIR", help="(internal) the transformers 5 half")
    args = parser.parse_args()
    if args.prepare:
        prepare(Path(args.prepare))
    else:
        main(args.only)
