"""The lm-eval adapter against a brute-force scorer, and real lm-eval tasks run offline on local JSONL files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from metala import MetaLAConfig, MetaLAForCausalLM


@dataclass
class Req:
    args: tuple


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_model):
    torch.manual_seed(0)
    model = MetaLAForCausalLM(MetaLAConfig.from_preset("tiny", vocab_size=1024), seed=1)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.self_aug.w_aug.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("exported")
    model.save_pretrained(str(out), tokenizer_file=tokenizer_model)
    return out


@pytest.fixture(scope="module")
def lm(exported):
    from eval.lm_eval_adapter import MetaLALM

    return MetaLALM(checkpoint=str(exported), batch_size=3, max_length=7)


def brute_logprob(model, ids: list[int], n_scored: int) -> tuple[float, bool]:
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
    targets = torch.tensor(ids[1:])
    lp = logp[-n_scored:]
    tg = targets[-n_scored:]
    return float(lp.gather(-1, tg[:, None]).sum()), bool((lp.argmax(-1) == tg).all())


def test_loglikelihood_matches_brute_force(lm):
    reqs = [
        Req(("Question: Who is the Prince of Denmark?\nAnswer:", " Hamlet")),
        Req(("Question: Who is the Prince of Denmark?\nAnswer:", " the melancholy Dane, son of the king")),
        Req(("Question: Who is the Prince of Denmark?\nAnswer:", " Lear")),
        Req(("To be, or not to be ", "that is the question")),
        Req(("", "An empty context scores from the prefix token alone.")),
    ]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    eos = lm.eot_token_id
    for req, (lp, greedy) in zip(reqs, got):
        ctx, cont = req.args
        if ctx:
            ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
            ids = [eos] + ctx_ids + cont_ids
        else:
            cont_ids = lm.tok_encode(cont)
            ids = [eos] + cont_ids
        ref_lp, ref_greedy = brute_logprob(lm.model, ids, len(cont_ids))
        assert lp == pytest.approx(ref_lp, rel=1e-4, abs=1e-3), req.args
        assert greedy == ref_greedy


def test_rolling_streams_the_state_across_windows(lm):
    text = "Of Mans First Disobedience, and the Fruit of that Forbidden Tree, whose mortal tast brought Death."
    (got,) = lm.loglikelihood_rolling([Req((text,))], disable_tqdm=True)
    tokens = lm.tok_encode(text)
    assert len(tokens) > 3 * lm.max_length
    ref, _ = brute_logprob(lm.model, [lm.prefix_token_id] + tokens, len(tokens))
    assert got == pytest.approx(ref, rel=1e-4)


def test_generate_until_stops_at_the_stop_string(lm):
    ctx = "The king said to his daughter"
    (free,) = lm.generate_until([Req((ctx, {"until": [], "max_gen_toks": 12}))], disable_tqdm=True)
    assert free
    stop = free.strip()[:2]
    (cut,) = lm.generate_until([Req((ctx, {"until": [stop], "max_gen_toks": 12}))], disable_tqdm=True)
    assert stop not in cut and free.startswith(cut)


def test_local_tasks_run_offline_through_lm_eval(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from eval.lm_eval import main

    payload = main(["--checkpoint", str(exported), "--tasks", "local", "--out", str(tmp_path), "--batch-size", "4"])
    res = payload["results"]
    assert 0.0 <= res["metala_local_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["metala_local_piqa"]["acc,none"] <= 1.0
    assert res["metala_local_ppl"]["word_perplexity,none"] > 1.0
    assert res["metala_local_gen"]["exact_match,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    table = (tmp_path / "lm_eval_results.md").read_text()
    assert "metala_local_mc (acc)" in table and "metala_local_ppl (word_perplexity)" in table
    assert json.loads((tmp_path / "lm_eval_results.json").read_text())["prefix"].startswith("EOS")
