"""The data-driven inits' driver (initpass.py, docs/methods.md section 13): the pass runs in chunks that fit the
memory budget, one pass serves every arm of its kind, and neither changes any arm's factors."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fluxlora import adapters, gradients, initpass, train
from fluxlora.families.flux import FAMILY as FLUX
from fluxlora.prepare import prepare

RANK = 2


def test_chunks_keep_the_order_and_fit_the_budget():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 8), torch.nn.Linear(8, 8),
                                torch.nn.Linear(8, 1))
    size = gradients.stat_bytes  # 32, 64, 256, 32 bytes
    names = ["0", "1", "2", "3"]
    assert initpass.chunks(model, names, size, 96) == [["0", "1"], ["2"], ["3"]]  # "2" alone exceeds it
    assert initpass.chunks(model, names, size, 10 ** 6) == [names]
    assert initpass.chunks(model, names, size, 1) == [[n] for n in names]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_flux, subject_dir):
    tmp = tmp_path_factory.mktemp("initpass")
    cfg = tiny_config(tmp, tiny_flux, subject_dir, adapter={"init": ["lora_ga", "lora_one", "lora_sb"],
                                                             "rank": RANK, "sb_batches": 2})
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    return cfg, prep, adapters.find_targets(prep.model, FLUX.target_presets["attn"])


def counted_pass(prep, cfg, calls: list):
    """The trainer's gradient pass, recording the bytes of statistics each call holds."""
    real = train.stat_passes(prep, cfg.train, cfg.adapter.sb_batches, cfg.data.prior_loss_weight)["gradients"]

    def run(targets):
        stats = real.run(targets)
        calls.append(sum(4 * g.numel() for g in stats.values()))
        return stats
    return initpass.Pass(run, real.nbytes)


def requests(cfg, targets, names):
    return [initpass.request(cfg, n, targets) for n in names]


def assert_same(a: initpass.Factors, b: initpass.Factors) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for name in a.tensors:
        for x, y in zip(a.tensors[name], b.tensors[name]):
            assert torch.equal(x, y), name


def test_a_chunked_pass_gives_the_same_factors_within_the_budget(prepared):
    cfg, prep, targets = prepared
    one, many = [], []
    whole = initpass.compute(prep.model, requests(cfg, targets, ["lora_ga"]), counted_pass(prep, cfg, one),
                             targets, 0, 10 ** 12)
    budget = 3 * max(gradients.stat_bytes(prep.model.get_submodule(n)) for n in targets)
    parts = initpass.compute(prep.model, requests(cfg, targets, ["lora_ga"]), counted_pass(prep, cfg, many),
                             targets, 0, budget)
    assert len(one) == 1 and whole["lora_ga"].chunks == 1
    assert len(many) == parts["lora_ga"].chunks == len(initpass.chunks(prep.model, targets, gradients.stat_bytes,
                                                                        budget)) > 2
    assert max(many) <= budget and parts["lora_ga"].peak_bytes == max(many) < one[0]
    assert_same(whole["lora_ga"], parts["lora_ga"])


def test_one_pass_serves_every_arm_and_each_gets_its_own_factors(prepared):
    cfg, prep, targets = prepared
    names = ["lora_ga", "lora_one", "lora_sb"]
    alone = {}
    for n in names:
        alone.update(initpass.compute(prep.model, requests(cfg, targets, [n]), counted_pass(prep, cfg, []),
                                      targets, 0, 10 ** 12))
    calls = []
    shared = initpass.Shared(pending=requests(cfg, targets, names))
    first = shared.factors(prep.model, requests(cfg, targets, ["lora_one"])[0], "gradients",
                           counted_pass(prep, cfg, calls), targets, 0, 10 ** 12)
    assert len(calls) == 1 and sorted(shared.ready) == ["lora_ga", "lora_sb"] and shared.pending == []
    others = {n: shared.factors(prep.model, requests(cfg, targets, [n])[0], "gradients",
                                counted_pass(prep, cfg, calls), targets, 0, 10 ** 12) for n in ["lora_ga", "lora_sb"]}
    assert len(calls) == 1 and shared.ready == {}  # the later arms ran no pass
    assert_same(first, alone["lora_one"])
    for n, f in others.items():
        assert_same(f, alone[n])
        assert f.layer == alone[n].layer


def test_a_run_with_three_gradient_arms_runs_the_pass_once(tmp_path, tiny_flux, subject_dir, monkeypatch, capsys):
    from fluxlora.runner import run

    calls = []
    real = train.gradient_pass

    def counting(prep, t, targets, batches, prior_weight):
        calls.append(len(targets))
        return real(prep, t, targets, batches, prior_weight)

    monkeypatch.setattr(train, "gradient_pass", counting)
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, adapter={"init": ["lora_ga", "lora_one", "eva"],
                                                                 "rank": RANK, "sb_batches": 2},
                      train={"steps": 1, "checkpoint_every": 0})
    results = run(cfg, warn=lambda m: None)
    assert all("error" not in r for r in results), results
    assert len(calls) == 1  # lora_ga computed lora_one's factors too; eva reads the activation pass
    out = capsys.readouterr().out
    assert "lora_ga: gradient pass over" in out and "shared by lora_ga, lora_one" in out
    assert "1 chunk(s)" in out and "eva: activation pass over" in out
