"""Loss trajectories of tiny 10-step runs, one per task and one pipelined layout, equal the golden
ones exactly (tests/data/golden.json, made by tests/golden_runs.py). pretrain, sft, reward, dpo,
kto and pipeline were recorded before the one-trainer restructuring and still match bit for bit;
ppo and grpo were re-recorded when PPO moved onto the loop: every random draw (sampling, minibatch
order, prompt order) now derives from (seed, step), so the trajectories differ from the old loop's."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_runs  # pylint: disable=wrong-import-position


@pytest.mark.parametrize('case', list(golden_runs.CASES))
def test_loss_trajectory_matches_the_golden_one(case, tmp_path):
  with open(golden_runs.GOLDEN, encoding='utf-8') as f:
    golden = {int(k): v for k, v in json.load(f)[case].items()}
  assert golden_runs.run_in_subprocess(case, str(tmp_path)) == golden
