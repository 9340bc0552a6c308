"""Loading a .gguf natively without gguf's reader on the hot path: genkit's metadata reader
(genkit/native/gguf_meta.py), the config built from it, the tokenizer converted once and then read
back from the cache, each checked against what gguf and transformers give for the same file."""

from __future__ import annotations

import pytest

import gguf_writer
import test_gguf_native

TEXTS = ["the cat sat on the mat. Ça!", "  lead  spaces\n\nnew", "<bos>x<eos></s><s>", "日本語 abc", "Hello, world?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny file per architecture of test_gguf_native, with a tokenizer of either kind."""
    folder = tmp_path_factory.mktemp("gguf-load")
    out = {}
    for i, (name, (model_type, overrides, types)) in enumerate(sorted(test_gguf_native.CASES.items())):
        model = gguf_writer.random_model(gguf_writer.tiny_config(model_type, **overrides))
        out[name] = gguf_writer.write(model, folder / f"{name}.gguf", types, tokenizer=("gpt2", "llama")[i % 2])
    return out


def test_index_equals_gguf_reader(files):
    from gguf import GGUFReader

    from genkit.native.gguf_file import read_index

    for name, path in files.items():
        reader = GGUFReader(str(path))
        want = [[t.name, t.tensor_type.name, [int(x) for x in t.shape], int(t.data_offset), int(t.n_bytes)]
                for t in reader.tensors]
        index = read_index(path)
        assert index["tensors"] == want, name
        assert index["architecture"] == str(reader.fields["general.architecture"].contents())
        assert index["has_tokenizer"]


def test_config_equals_transformers(files):
    from transformers import AutoConfig

    from genkit.native.gguf_meta import GGUFMeta, transformers_config

    for name, path in files.items():
        want = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
        got = transformers_config(GGUFMeta.read(path)).to_dict()
        assert {**got, "_name_or_path": ""} == {**want, "_name_or_path": ""}, name


def test_cached_tokenizer_equals_transformers(files, genkit_home):
    """The first load converts and caches, the second reads the cache (prefetched on a thread):
    both tokenize and detokenize as transformers' AutoTokenizer does from the file."""
    from transformers import AutoTokenizer

    from genkit import models

    for name in ("gemma3", "llama"):
        path = files[name]
        want = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        for _ in range(2):
            got = models.load(str(path)).tokenizer
            for text in TEXTS:
                ids = want(text).input_ids
                assert got(text).input_ids == ids, (name, text)
                assert got.decode(ids) == want.decode(ids) and got.decode(ids, skip_special_tokens=True) == \
                    want.decode(ids, skip_special_tokens=True)
            assert got.all_special_ids == want.all_special_ids and got.chat_template == want.chat_template


def test_corrupt_metadata_is_one_error(files, tmp_path):
    from genkit.errors import GenkitError
    from genkit.native.gguf_meta import GGUFMeta

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(files["llama"].read_bytes()[:200])
    with pytest.raises(GenkitError, match="cut.gguf is a corrupt GGUF file"):
        GGUFMeta.read(cut)
