"""Every method's defaults are its authors' published recipe (SDPO: lasgroup/SDPO
``actor.yaml``/``sdpo.yaml``; RLSD: iie-ycx/RLSD ``rlsd_train.sh``; GRPO: TRL's
``GRPOTrainer``), written here as tables and checked against the resolved config."""

import numpy as np
import pytest

from conftest import tiny_chat_tokenizer

from amrsd_jax.credit import grpo_advantages, rlsd_lambda
from amrsd_jax.methods import base as method_base
from amrsd_jax.methods.sdpo import SDPO
from amrsd_jax.models.tokenizer import apply_chat_template
from amrsd_jax.reflection.contexts import sdpo_teacher_prompt
from amrsd_jax.rewards import VerifierResult
from amrsd_jax.rollout.prompts import fit_privileged
from amrsd_jax.rollout.records import Rollouts, Verified
from amrsd_jax.train.config import load_train_config

RECIPES = {
    # method -> (method_config, teacher)
    "sdpo": ({"mode": "topk", "topk": 100, "alpha": 0.5, "is_clip": 2.0, "tis_cap": 2.0,
              "distill_weight": 1.0, "feedback_only_without_solution": True},
             {"weights": "ema", "ema_rate": 0.05, "refresh_every": 0}),
    "rlsd": ({"lam": 0.5, "eps_w": 0.2, "decay_steps": 60},
             {"weights": "frozen", "ema_rate": 0.05, "refresh_every": 20}),
    "amr_sd": ({"lam": 0.2, "gam": 0.1, "tau": 0.5, "kappa": 5.0, "decay_steps": 50},
               {"weights": "live", "ema_rate": 0.05, "refresh_every": 0}),
    "grpo": ({}, None),
    # no reference code was published: our form (credit/hapo.py), a reallocation
    "hapo": ({"alpha": 0.2, "phi": 2.0, "form": "reallocate"}, None),
}
# TRL GRPOTrainer: (r - mean) / (std + 1e-4), std unbiased (Bessel); scale_rewards="group"
GRPO = {"advantage_scale": "group", "advantage_std_ddof": 1, "advantage_eps": 1e-4}


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_resolved_defaults_are_the_authors_recipe(method):
    resolved = load_train_config(None, [f"method={method}"]).resolved_dict()
    settings, teacher = RECIPES[method]
    assert resolved["method_config"] == {method: settings}
    assert resolved["teacher"] == teacher
    assert {k: resolved[k] for k in GRPO} == GRPO


def test_grpo_advantages_use_the_unbiased_group_std():
    rewards = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    cfg = load_train_config(None, []).step_config()
    got = np.asarray(grpo_advantages(rewards, scale=cfg.advantage_scale, eps=cfg.advantage_eps,
                                     std_ddof=cfg.advantage_std_ddof))
    expected = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_rlsd_lambda_decays_linearly_to_zero_over_60_steps():
    cfg = load_train_config(None, ["method=rlsd"]).make_method().config
    # the authors count steps from 1: lam_eff = 0.5 * max(0, 1 - step / 60)
    for step0, expected in ((0, 0.5 * 59 / 60), (30, 0.5 * 29 / 60), (59, 0.0), (60, 0.0)):
        assert float(rlsd_lambda(cfg, step0)) == pytest.approx(expected, abs=1e-7)


def _rollouts(correct, feedback, texts):
    results = [VerifierResult(float(c), bool(c), None, None, f) for c, f in
               zip(correct, feedback)]
    verified = Verified(results, np.array(correct, np.float32), np.array(correct, bool), 0)
    n = len(correct)
    return Rollouts([{"prompt": "What is 3 + 4?", "answer": "7"}] * n, None, None, None,
                    list(texts), verified, verified.rewards, None, 2)


def _messages(method, rollouts, monkeypatch):
    class Ctx:  # what teacher_inputs reads of the loop's context
        tokenizer = tiny_chat_tokenizer()

        class config:
            class reflection:
                max_teacher_prompt_tokens = 4096

            class model:
                system_prompt = None

    captured = {}

    def capture(tokenizer, messages, *args, **kwargs):
        captured["messages"] = list(messages)
        return np.zeros((len(messages), 1)), np.zeros((len(messages), 1)), \
            np.array([m is not None for m in messages]), 0

    monkeypatch.setattr(method_base, "encode_teacher_prompts", capture)
    method.teacher_inputs(Ctx, rollouts)
    return captured["messages"]


def test_sdpo_reprompt_uses_feedback_only_without_a_peer_solution(monkeypatch):
    # group 1: one success (row 0) -> row 1 sees the solution only; group 2: none ->
    # each row sees its own feedback
    rollouts = _rollouts([1, 0, 0, 0], ["", "wrong value: got 8", "wrong value: got 9",
                                        "no answer found"],
                         ["3 + 4 = 7. Answer: 7", "Answer: 8", "Answer: 9", "I think"])
    messages = _messages(SDPO(), rollouts, monkeypatch)
    q = "What is 3 + 4?"
    assert messages == [None,  # the only success has no other successful peer
                        sdpo_teacher_prompt(q, "3 + 4 = 7. Answer: 7", None),
                        sdpo_teacher_prompt(q, None, "wrong value: got 9"),
                        sdpo_teacher_prompt(q, None, "no answer found")]
    both = _messages(SDPO(SDPO.config_type(feedback_only_without_solution=False)), rollouts,
                     monkeypatch)
    assert both[1] == sdpo_teacher_prompt(q, "3 + 4 = 7. Answer: 7", "wrong value: got 8")


def test_an_over_long_teacher_prompt_cuts_the_privileged_part_never_the_question():
    tok = tiny_chat_tokenizer()
    question = "Tom has 4 apples and buys 3 more. How many apples?"
    solution = " ".join(["add them"] * 200) + " Answer: 7"
    message, cut = fit_privileged(tok, lambda p: sdpo_teacher_prompt(question, p, None),
                                  solution, max_tokens=96)
    assert cut and message.startswith(question)
    assert message.endswith("Correctly solve the original question.")
    text = apply_chat_template(tok, [message])[0]
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= 96
    short, cut = fit_privileged(tok, lambda p: sdpo_teacher_prompt(question, p, None),
                                "Answer: 7", max_tokens=96)
    assert not cut and short == sdpo_teacher_prompt(question, "Answer: 7", None)
