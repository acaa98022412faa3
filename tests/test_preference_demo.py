"""The post-training demo (experiments/preference_demo.py): its rule, its data and a quick run."""

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


def test_quick_run_end_to_end(tmp_path):
  figures = demo.main([f'--workdir={tmp_path}', '--quick', '--samples=32'])
  assert figures == json.loads((tmp_path / 'figures.json').read_text())
  assert 0.0 <= figures['reward_model_held_out_accuracy'] <= 1.0
  # the base scored against itself: KL exactly 0
  assert figures['sft']['kl_to_base'] == pytest.approx(0.0, abs=1e-5)
  for name in ('dpo', 'ppo'):
    assert figures[name]['kl_to_base'] != pytest.approx(0.0, abs=1e-6)  # the policy moved
    assert 0.0 <= figures[name]['preferred_share'] <= 1.0
  ppo = json.loads((tmp_path / 'ppo' / 'summary.json').read_text())
  assert ppo['finished']
