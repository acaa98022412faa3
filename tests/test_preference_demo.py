"""The post-training demo (experiments/preference_demo.py): its rule, its data and its result."""

import importlib.util
import json
import os

import pytest

from lmjax.data.jsonl import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    'preference_demo', os.path.join(ROOT, 'experiments', 'preference_demo.py'))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def test_rule_reward_is_the_share_of_positive_words():
  assert demo.rule_reward(' good bad nice awful.') == 0.5
  assert demo.rule_reward(' good great nice calm.') == 1.0
  assert demo.rule_reward(' good. bad. rude.') == pytest.approx(1 / 3)
  assert demo.rule_reward(' of the.') == 0.0  # no adjective at all
  assert demo.rule_reward('') == 0.0


def test_data_follows_the_rule(tmp_path):
  paths = demo.make_data(str(tmp_path), sft_examples=400, pairs=300, held_out_pairs=50)
  for name in ('pairs', 'held_out_pairs'):
    for record in read_jsonl(paths[name]):
      assert demo.rule_reward(record['chosen']) > demo.rule_reward(record['rejected'])
  held_out = {demo.prompt_for(n) for n in demo.HELD_OUT_NOUNS}
  assert {r['prompt'] for r in read_jsonl(paths['held_out_pairs'])} <= held_out
  for name in ('sft', 'pairs', 'prompts'):
    assert not {r['prompt'] for r in read_jsonl(paths[name])} & held_out
  # SFT words are uniform: the base's rule reward is 1/2 and about 5/16 of completions are
  # rule-preferred (3 or 4 positive words of 4)
  rewards = [demo.rule_reward(r['response']) for r in read_jsonl(paths['sft'])]
  assert sum(rewards) / len(rewards) == pytest.approx(0.5, abs=0.05)
  assert sum(r > 0.5 for r in rewards) / len(rewards) == pytest.approx(5 / 16, abs=0.06)


def test_demo_run_beats_the_sft_base(tmp_path):
  """The demo as the README runs it, not --quick (a tenth of the steps still takes ~85% of the CPU
  time, compiling dominates, and leaves the SFT base half-trained). What the README reports: DPO
  and PPO each raise the share of rule-preferred completions on held-out prompts far above the SFT
  base's (31.4% -> 96.9% and 100%); asserted here as at least 30 points each."""
  figures = demo.main([f'--workdir={tmp_path}'])
  assert figures == json.loads((tmp_path / 'figures.json').read_text())
  base = figures['sft']['preferred_share']
  assert base == pytest.approx(5 / 16, abs=0.1)  # uniform words: 3 or 4 of 4 positive
  for name in ('dpo', 'ppo'):
    assert figures[name]['preferred_share'] >= base + 0.30, figures
    assert figures[name]['rule_reward'] > figures['sft']['rule_reward'] + 0.2, figures
    assert figures[name]['kl_to_base'] > 0.1  # the policy moved
  assert figures['reward_model_held_out_accuracy'] >= 0.9
  assert figures['sft']['kl_to_base'] == pytest.approx(0.0, abs=1e-5)  # the base against itself
  ppo = json.loads((tmp_path / 'ppo' / 'summary.json').read_text())
  assert ppo['finished']
