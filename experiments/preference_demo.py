"""Post-training demo on a synthetic task with a known rule: SFT -> reward model -> DPO and PPO.

  python experiments/preference_demo.py --workdir=runs/preference_demo [--quick]

The task: a prompt `review of the <noun>:` is answered with four words, each one of eight positive
or eight negative adjectives, and a full stop. The rule scores a completion by the share of its
words that are positive; a completion is *rule-preferred* when most of its words are positive.

  1. sft     a tiny model learns the format from completions with uniformly random words
             (so the base policy writes rule-preferred completions about 5/16 of the time);
  2. reward  a reward model (the SFT model + a scalar head) learns from pairs where the chosen
             completion has more positive words; its pair accuracy is measured on held-out pairs;
  3. dpo     LoRA-DPO on the same pairs (the reference is the SFT model: the adapter switched
             off, no second copy), with RPO's NLL term on the chosen responses
             (`post.chosen_nll_coef`), which keeps plain DPO from pushing probability onto tokens
             neither response uses;
  4. ppo     PPO from the SFT model against the trained reward model (not the rule), with a KL
             penalty to the SFT model.
Every stage is an `lmjax train` command (printed as it runs; a re-run resumes or skips finished
stages). At the end the script samples each policy on held-out prompts and prints the rule's
figures: the reward model's held-out accuracy, the share of rule-preferred completions and the
mean rule reward of the base, DPO and PPO policies, and their KL to the base.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import jax
import numpy as np

from lmjax import cli
from lmjax.data import load_or_train_tokenizer
from lmjax.data import preference
from lmjax.data.jsonl import read_jsonl, write_jsonl
from lmjax.inference.generate import SamplingConfig, generate
from lmjax import tasks
from lmjax import workdir as workdir_lib
from lmjax.tasks import preference as preference_task

POSITIVE = ('good', 'great', 'nice', 'fine', 'happy', 'bright', 'calm', 'kind')
NEGATIVE = ('bad', 'poor', 'awful', 'dull', 'sad', 'dark', 'rude', 'cold')
NOUNS = ('apple', 'river', 'house', 'garden', 'train', 'book', 'song', 'city', 'coffee', 'movie',
         'hotel', 'bridge', 'market', 'school', 'beach', 'forest', 'kitchen', 'museum', 'lamp',
         'bicycle', 'window', 'mountain', 'island', 'theater')
WORDS = 4
SFT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                          'sft_tiny.py')
HELD_OUT_NOUNS = NOUNS[-4:]
# LoRA on every linear layer and the output head: which adjective comes next is mostly the head's
# choice ('all-linear' alone, as in Hugging Face PEFT, leaves it frozen and reached 52-62%)
LORA_TARGETS = r'attn/(q|k|v|o)$|mlp/(gate|up|down)$|lm_head'  # prompts never seen in training: the final sampling evaluation


def prompt_for(noun: str) -> str:
  return f'review of the {noun}:'


def completion(words) -> str:
  return ' ' + ' '.join(words) + '.'


def rule_reward(text: str) -> float:
  """Share of the completion's words that are positive (0 when it has no adjective)."""
  words = [w.strip('.,:;!?') for w in text.split()]
  scored = [w for w in words if w in POSITIVE or w in NEGATIVE]
  return sum(w in POSITIVE for w in scored) / len(scored) if scored else 0.0


def random_completion(rng, positives: int) -> str:
  words = list(rng.choice(POSITIVE, positives)) + list(rng.choice(NEGATIVE, WORDS - positives))
  rng.shuffle(words)
  return completion(words)


def make_data(directory: str, seed: int = 0, sft_examples: int = 4000, pairs: int = 3000,
              held_out_pairs: int = 400) -> dict[str, str]:
  """Writes the JSONL files of the task; returns their paths."""
  rng = np.random.default_rng(seed)
  train_nouns = NOUNS[:-len(HELD_OUT_NOUNS)]
  paths = {name: os.path.join(directory, f'{name}.jsonl')
           for name in ('corpus', 'sft', 'pairs', 'held_out_pairs', 'prompts')}

  def write(name, records):
    write_jsonl(paths[name], records)

  def sft_record():
    words = rng.choice(POSITIVE + NEGATIVE, WORDS)
    return {'prompt': prompt_for(rng.choice(train_nouns)), 'response': completion(words)}

  def pair_record(nouns):
    better, worse = sorted(rng.choice(WORDS + 1, 2, replace=False), reverse=True)
    return {'prompt': prompt_for(rng.choice(nouns)), 'chosen': random_completion(rng, better),
            'rejected': random_completion(rng, worse)}

  os.makedirs(directory, exist_ok=True)
  sft_records = [sft_record() for _ in range(sft_examples)]
  write('sft', sft_records)
  write('corpus', [{'text': r['prompt'] + r['response']} for r in sft_records])
  write('pairs', [pair_record(train_nouns) for _ in range(pairs)])
  write('held_out_pairs', [pair_record(HELD_OUT_NOUNS) for _ in range(held_out_pairs)])
  write('prompts', [{'prompt': prompt_for(n)} for n in train_nouns])
  return paths


def stage_commands(workdir: str, paths: dict[str, str], quick: bool) -> dict[str, list[str]]:
  """The `lmjax train` argument lists of the four stages."""
  run = lambda name: os.path.join(workdir, name)
  scale = (lambda n: max(n // 10, 2)) if quick else (lambda n: n)
  common = [f'--config={SFT_CONFIG}', f'--config.data.source={paths["corpus"]}',
            '--config.seq_len=48', '--config.checkpoint_every=100000', '--config.log_every=25']
  return {
      'sft': common + [f'--workdir={run("sft")}', f'--config.post.train_file={paths["sft"]}',
                       '--config.peft.method=none', f'--config.steps={scale(300)}',
                       '--config.batch_size=16', '--config.optimizer.learning_rate=3e-3'],
      'reward': common + [f'--workdir={run("reward")}', '--config.task=reward',
                          f'--config.init_from={run("sft")}', '--config.peft.method=none',
                          f'--config.post.train_file={paths["pairs"]}',
                          f'--config.steps={scale(300)}', '--config.batch_size=16',
                          '--config.optimizer.learning_rate=1e-3',
                          '--config.post.center_coef=0.01'],
      'dpo': common + [f'--workdir={run("dpo")}', '--config.task=dpo',
                       f'--config.init_from={run("sft")}', '--config.peft.method=lora',
                       f'--config.peft.targets={LORA_TARGETS}', '--config.peft.rank=8',
                       f'--config.post.train_file={paths["pairs"]}', '--config.post.beta=0.1',
                       '--config.post.chosen_nll_coef=0.5', f'--config.steps={scale(300)}',
                       '--config.batch_size=16', '--config.optimizer.learning_rate=1e-3'],
      'ppo': common + [f'--workdir={run("ppo")}', '--config.task=ppo',
                       f'--config.init_from={run("sft")}', '--config.peft.method=none',
                       f'--config.post.train_file={paths["prompts"]}',
                       f'--config.post.reward_model={run("reward")}',
                       f'--config.steps={scale(40)}', '--config.log_every=5',
                       '--config.post.rollout_batch=64', '--config.post.minibatches=4',
                       '--config.post.ppo_epochs=2', '--config.post.max_new_tokens=8',
                       '--config.post.kl_coef=0.1', '--config.optimizer.learning_rate=3e-4'],
  }


def reward_accuracy(workdir: str, pairs_path: str, tok, row_len: int = 49) -> float:
  """Held-out pair accuracy of the reward model in `workdir`: P(score(chosen) > score(rejected))."""
  task, params = tasks.load_task_params(workdir)
  pairs = [preference.encode_pair(tok, r) for r in read_jsonl(pairs_path)]
  score = jax.jit(lambda p, rows: preference_task.reward_scores(task, p, rows))
  chosen, rejected = (np.asarray(score(params, preference.pad_rows([p[side] for p in pairs],
                                                                   row_len)))
                      for side in (0, 1))
  return float(np.mean(chosen > rejected))


def evaluate_policy(workdir: str, base_params, tok, samples: int, seed: int = 0) -> dict:
  """Samples `samples` completions of the held-out prompts at temperature 1 and scores them with
  the rule; KL(policy || base) is the mean of log pi - log base over the samples (k1)."""
  task, _ = tasks.load_task_params(workdir)
  model_cfg = task.model
  policy = tasks.load_trained(workdir)[1]
  prompts = [[tok.bos_id] + tok.encode(prompt_for(HELD_OUT_NOUNS[i % len(HELD_OUT_NOUNS)]))
             for i in range(samples)]
  out = generate(model_cfg, policy, prompts, SamplingConfig(max_new_tokens=10, temperature=1.0,
                                                            stop_ids=(tok.eos_id,)),
                 seed=seed, pad_id=tok.pad_id)
  texts, examples = [], []
  for prompt, tokens, length in zip(prompts, out['tokens'], out['lengths']):
    response = [int(t) for t in tokens[:length]]
    texts.append(tok.decode([t for t in response if t != tok.eos_id]))
    examples.append((prompt + response, [0] * len(prompt) + [1] * len(response)))
  batch = preference.pad_rows(examples, max(len(e[0]) for e in examples))
  seq_logp = jax.jit(lambda p, b: preference_task.rows_log_probs(task, p, b))
  kl = np.asarray(seq_logp(policy, batch)) - np.asarray(seq_logp(base_params, batch))
  rewards = np.asarray([rule_reward(t) for t in texts])
  return {'rule_reward': float(rewards.mean()), 'preferred_share': float(np.mean(rewards > 0.5)),
          'kl_to_base': float(kl.mean()), 'example': texts[0]}


def run_stage(name: str, args: list[str]) -> None:
  print(f'\n=== {name}: lmjax train {" ".join(shlex.quote(a) for a in args)}', flush=True)
  if cli.main(['train', '--no_sample'] + args) != 0:
    raise SystemExit(f'stage {name} failed')


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--quick', action='store_true', help='a tenth of the steps (a smoke test)')
  parser.add_argument('--samples', type=int, default=512, help='completions sampled per policy')
  args = parser.parse_args(argv)
  paths = make_data(os.path.join(args.workdir, 'data'))
  commands = stage_commands(args.workdir, paths, args.quick)
  for name, stage_args in commands.items():
    run_stage(name, stage_args)
  config = workdir_lib.read_config(os.path.join(args.workdir, 'sft'))
  tok = load_or_train_tokenizer(config.data, config.model.vocab_size)
  base = tasks.load_trained(os.path.join(args.workdir, 'sft'))[1]
  figures = {'reward_model_held_out_accuracy': reward_accuracy(
      os.path.join(args.workdir, 'reward'), paths['held_out_pairs'], tok)}
  for name in ('sft', 'dpo', 'ppo'):
    figures[name] = evaluate_policy(os.path.join(args.workdir, name), base, tok, args.samples)
  with open(os.path.join(args.workdir, 'figures.json'), 'w', encoding='utf-8') as f:
    json.dump(figures, f, indent=2)
  print(f'\nreward model: held-out pair accuracy {figures["reward_model_held_out_accuracy"]:.3f}')
  print(f'{"policy":8s} {"rule-preferred":>15s} {"rule reward":>12s} {"KL to base":>11s}  example')
  for name in ('sft', 'dpo', 'ppo'):
    f = figures[name]
    print(f'{name:8s} {f["preferred_share"]:15.3f} {f["rule_reward"]:12.3f} '
          f'{f["kl_to_base"]:11.3f}  {f["example"]!r}')
  return figures


if __name__ == '__main__':
  main(sys.argv[1:])
