"""Serving straight from model files: no private copy in the parent, one copy in the page
cache for every worker, and each format's outputs equal to the model in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import modelzoo
import workerpool as wp
from workerpool.sources.files import load_huggingface

MIB = modelzoo.MIB
X = torch.randn(4, 1024, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    return modelzoo.save_weight_files(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def expected():
    return modelzoo.reference(modelzoo.mlp_64mib, modelzoo.torch_predict, X)


def warm_stats(pool, n_workers):
    for _ in range(50):
        list(pool.map([X] * (4 * n_workers)))
        stats = pool.stats()
        if all(w["requests_served"] for w in stats["workers"]):
            return stats
    pytest.fail("not every worker served")


@pytest.mark.parametrize("kind", ["safetensors", "checkpoint"])
def test_weight_file_is_served_from_its_pages_by_four_workers(weight_files, expected, kind):
    totals = {}
    for n_workers in (1, 4):
        with wp.Pool.from_file(weight_files[kind], modelzoo.torch_predict,
                               builder=modelzoo.mlp_64mib_builder, workers=n_workers,
                               threads_per_worker=1) as pool:
            answers = list(pool.map([X] * 8))
            assert len(answers) == 8 and all(torch.equal(y, expected) for y in answers)
            stats = warm_stats(pool, n_workers)
            totals[n_workers] = stats["total_pss"]
            # every weight came from the file: nothing was copied into the memfd
            assert stats["file_backed_bytes"] >= 64 * MIB
            assert stats["model_bytes"] - stats["file_backed_bytes"] == 0
            assert stats["weight_files"] == [weight_files[kind]]
            for worker in stats["workers"]:
                assert worker["weights_rss"] >= 64 * MIB * 0.95
                assert worker["weights_copied"] == 0
                assert all(m["perms"].startswith("r-") for m in worker["weights_mappings"])
    added = totals[4] - totals[1]
    assert added < 3 * 40 * MIB, f"4 workers cost {added / MIB:.0f} MiB more than 1"


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = {paths!r}
    import torch, modelzoo, workerpool
    from workerpool.sources import files

    def rss():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {{k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}}

    if __name__ == "__main__":
        path, how = sys.argv[1], sys.argv[2]
        runtime = rss()["VmRSS"]
        if how == "workerpool":
            with workerpool.Pool.from_file(path, modelzoo.torch_predict, workers=1,
                                           builder=modelzoo.mlp_64mib_builder) as pool:
                pool.submit(torch.zeros(1, 1024)).result()
                peak = rss()["VmHWM"]
        else:  # the usual way: a private copy
            model = modelzoo.mlp_64mib_builder()
            model.load_state_dict(torch.load(path, weights_only=True))
            peak = rss()["VmHWM"]
        print(json.dumps({{"runtime": runtime, "peak": peak}}))
""")


def test_parent_never_holds_a_private_copy_while_loading(tmp_path, weight_files):
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT.format(paths=sys.path))

    def growth(path, how):
        out = subprocess.run([sys.executable, str(script), path, how], capture_output=True,
                             text=True, check=True, timeout=300).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        return measured["peak"] - measured["runtime"]

    size = 64 * MIB
    for kind in ("safetensors", "checkpoint"):
        grown = growth(weight_files[kind], "workerpool")
        assert grown < 1.3 * size, f"{kind}: parent grew {grown / MIB:.0f} MiB"
        assert grown < 0.5 * size, f"{kind}: parent made a copy ({grown / MIB:.0f} MiB)"
    # the measurement does see a private copy when there is one
    assert growth(weight_files["checkpoint"], "torch.load") > 0.9 * size


def test_preload_copies_the_file_into_the_shared_segment(weight_files, expected):
    with wp.Pool.from_file(weight_files["safetensors"], modelzoo.torch_predict,
                           builder=modelzoo.mlp_64mib_builder, workers=2, preload=True,
                           threads_per_worker=1) as pool:
        answers = list(pool.map([X] * 4))
        assert len(answers) == 4 and all(torch.equal(y, expected) for y in answers)
        stats = pool.stats(memory_usage=False)
    assert stats["file_backed_bytes"] == 0 and stats["model_bytes"] >= 64 * MIB


def test_state_dict_without_builder_is_served_as_a_dict(weight_files):
    def matmul_first(state, x):
        return x @ state["0.weight"].T + state["0.bias"]

    state = modelzoo.mlp_64mib().state_dict()
    with wp.Pool(weight_files["safetensors"], matmul_first, workers=1,
                 threads_per_worker=1) as pool:
        got = pool.submit(X).result(timeout=60)
    with modelzoo.torch_threads(1):
        assert torch.equal(got, X @ state["0.weight"].T + state["0.bias"])


def test_whole_pickled_modules_need_trust_pickle(tmp_path):
    path = str(tmp_path / "whole.pt")
    torch.save(modelzoo.mlp(), path)
    x = torch.randn(2, 32)
    with pytest.raises(wp.ModelSourceError, match="trust_pickle=True"):
        wp.Pool(path, modelzoo.torch_predict, workers=1)
    with wp.Pool(path, modelzoo.torch_predict, workers=1, trust_pickle=True,
                 threads_per_worker=1) as pool:
        assert torch.equal(pool.submit(x).result(timeout=60),
                           modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x))
        assert pool.stats(memory_usage=False)["file_backed_bytes"] > 0  # mmap'd, not copied


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_torchscript_and_exported_programs(tmp_path, start_method, fmt):
    net, x = modelzoo.mlp(), torch.randn(3, 32)
    path = str(tmp_path / ("net.pt" if fmt == "torchscript" else "net.pt2"))
    if fmt == "torchscript":
        torch.jit.script(net).save(path)
    else:
        torch.export.save(torch.export.export(net, (x,)), path)
    expected = modelzoo.reference(modelzoo.mlp, modelzoo.torch_predict, x)
    with wp.Pool(path, modelzoo.torch_predict, workers=2, start_method=start_method,
                 threads_per_worker=1) as pool:
        answers = list(pool.map([x] * 6))
        assert len(answers) == 6 and all(torch.equal(y, expected) for y in answers)
        assert pool.stats()["zygote"]["threads_at_boot"] == 1


def test_missing_and_unsupported_files_say_what_to_do(tmp_path):
    with pytest.raises(wp.ModelSourceError, match="no model file"):
        wp.Pool(str(tmp_path / "nope.safetensors"), modelzoo.torch_predict)
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(b"not a zip")
    with pytest.raises(wp.ModelSourceError, match="legacy"):
        wp.Pool(str(legacy), modelzoo.torch_predict)


def hf_predict(hf, texts):
    encoded = hf.tokenizer(texts, return_tensors="pt", padding=True)
    return hf.model(**encoded).last_hidden_state


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("bert")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello",
                                "world", "shared", "weights", "once"]) + "\n")
    config = transformers.BertConfig(vocab_size=10, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(directory)  # random, no download
    transformers.BertTokenizer(str(vocab)).save_pretrained(directory)
    return str(directory)


def test_hugging_face_directory_model_and_tokenizer(hf_directory):
    texts = ["hello world", "shared weights once", "hello"]
    hf = load_huggingface(hf_directory)
    with modelzoo.torch_threads(1), torch.inference_mode():
        expected = hf_predict(hf, texts)
    with wp.Pool(hf_directory, hf_predict, workers=2, threads_per_worker=1) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(texts) for _ in range(4)]]
        stats = pool.stats(memory_usage=False)
    assert all(torch.equal(y, expected) for y in results)
    assert stats["weight_files"] == [f"{hf_directory}/model.safetensors"]
    assert stats["file_backed_bytes"] > 0.9 * sum(
        p.numel() * p.element_size() for p in hf.model.parameters())


def test_remote_url_is_fetched_once_into_the_cache_then_mapped(weight_files, expected,
                                                               tmp_path, monkeypatch):
    fsspec = pytest.importorskip("fsspec")
    monkeypatch.setenv("WORKERPOOL_CACHE", str(tmp_path / "cache"))
    url = f"memory://models/{tmp_path.name}/mlp.safetensors"
    with open(weight_files["safetensors"], "rb") as local, fsspec.open(url, "wb") as remote:
        remote.write(local.read())
    try:
        for _ in range(2):  # the second start finds the cached copy
            with wp.Pool.from_file(url, modelzoo.torch_predict, workers=1,
                                   builder=modelzoo.mlp_64mib_builder,
                                   threads_per_worker=1) as pool:
                assert torch.equal(pool.submit(X).result(timeout=60), expected)
                (cached,) = pool.stats(memory_usage=False)["weight_files"]
        assert cached.startswith(str(tmp_path / "cache"))
        assert len(list((tmp_path / "cache").glob("*/mlp.safetensors"))) == 1
    finally:
        fsspec.filesystem("memory").rm(f"models/{tmp_path.name}", recursive=True)
