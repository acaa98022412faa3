"""lmjax.data.examples / chat: the record shapes, chat templates, TRL-order truncation, the report
and the held-out split. A character tokenizer makes every expected token list easy to write."""

import json

import pytest

from lmjax.data import chat, examples, fields
from lmjax.data.jsonl import DataError


class CharTok:
  bos_id, eos_id, pad_id = 1, 2, 0
  path = ''

  def encode(self, text):
    return [3 + ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i - 3) for i in ids if i >= 3)


T = CharTok()
enc = T.encode
HH_PROMPT = '\n\nHuman: What is 2+2?\n\nAssistant: Four.\n\nHuman: And 3+3?\n\nAssistant:'


def _rows(example):
  prompt, responses = example[:2]
  return [(prompt + r, [0] * len(prompt) + m) for r, m in responses]


def test_implicit_prompt_is_the_shared_prefix_at_a_turn_boundary():
  chosen, rejected = HH_PROMPT + ' Six.', HH_PROMPT + ' Seven, I think.'
  assert examples.implicit_prompt(chosen, rejected) == HH_PROMPT
  # the shared prefix runs into the reply (' S'): cut back to the assistant marker
  assert examples.implicit_prompt(HH_PROMPT + ' Sure', HH_PROMPT + ' So') == HH_PROMPT
  assert examples.implicit_prompt('a b c', 'a b d') == 'a b '  # no marker: a word boundary
  assert examples.implicit_prompt('xyz', 'abc') == ''


def test_every_preference_shape_gives_the_same_rows():
  want = [([T.bos_id] + enc(HH_PROMPT + reply) + [T.eos_id],
           [0] * (1 + len(HH_PROMPT)) + [1] * (len(reply) + 1)) for reply in (' Six.', ' Nine.')]
  e = examples.Encoder(T)
  explicit = {'prompt': HH_PROMPT, 'chosen': ' Six.', 'rejected': ' Nine.'}
  implicit = {'chosen': HH_PROMPT + ' Six.', 'rejected': HH_PROMPT + ' Nine.'}
  assert _rows(e.pair(explicit)) == want
  assert _rows(e.pair(implicit)) == want
  mapped = examples.Encoder(T, fields.FieldMap.parse('prompt=q.text,chosen=good,rejected=bad',
                                                     fields.PREFERENCE_FIELDS))
  assert _rows(mapped.pair({'q': {'text': HH_PROMPT}, 'good': ' Six.', 'bad': ' Nine.'})) == want


def test_chat_preference_lists_share_their_leading_messages():
  user = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  e = examples.Encoder(T)
  lists = {'chosen': user + [{'role': 'assistant', 'content': 'Hello'}],
           'rejected': user + [{'role': 'assistant', 'content': 'Go away'}]}
  context = {'messages': user, 'chosen': 'Hello', 'rejected': 'Go away'}
  got, want = _rows(e.pair(lists)), _rows(e.pair(context))
  assert got == want
  head = [T.bos_id] + enc('<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n')
  assert want[0] == (head + enc('Hello') + [T.eos_id], [0] * len(head) + [1] * 6)


def test_sft_shapes_and_multi_turn_loss_on_assistant_turns_only():
  e = examples.Encoder(T)
  turns = [{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'},
           {'role': 'user', 'content': 'c'}, {'role': 'assistant', 'content': 'd'}]
  (tokens, mask), = _rows(e.sft({'messages': turns}))
  text = '<|user|>\na\n<|assistant|>\nb$<|user|>\nc\n<|assistant|>\nd$'  # $: eos
  assert tokens == [T.bos_id] + [T.eos_id if c == '$' else 3 + ord(c) for c in text]
  trained = [c for c, m in zip([None] + list(text), mask) if m]
  assert trained == ['b', '$', 'd', '$']  # each reply and its eos, nothing else
  assert _rows(e.sft({'prompt': 'p', 'completion': 'r'})) == [
      ([T.bos_id] + enc('pr') + [T.eos_id], [0, 0, 1, 1])]
  assert _rows(e.sft({'text': 'xy'})) == [([T.bos_id] + enc('xy') + [T.eos_id], [0, 1, 1, 1])]
  with pytest.raises(DataError, match='expected prompt \\+ response, messages or text'):
    e.sft({'question': 'x'})


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_models_own_jinja_template_from_tokenizer_config(tmp_path):
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'chat_template': CHATML}))
  tok = CharTok()
  tok.path = str(tmp_path / 'tokenizer.json')
  source = chat.template_text('', tok)
  assert source == CHATML and chat.template_text('default', tok) == ''
  turns = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
  (tokens, mask), = _rows(examples.Encoder(tok, template=source).sft({'messages': turns}))
  text = '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n'
  assert tokens == [T.bos_id] + enc(text)
  assert ''.join(c for c, m in zip(' ' + text, mask) if m) == 'yo<|im_end|>\n'


def test_truncation_in_trls_order():
  ex = lambda p, *rs: ([T.bos_id] + list(range(10, 10 + p)), [(list(range(50, 50 + n)), [1] * n)
                                                             for n in rs])
  # fits: nothing is cut, even with a prompt over max_prompt_length
  prompt, out, pc, rc, why = examples.truncate(*ex(9, 5), row_len=16, max_prompt_length=4)
  assert (len(prompt), [len(r) for r, _ in out], pc, rc, why) == (10, [5], False, False, '')
  # too long: the prompt is cut from the left to 4 tokens, [bos] kept; the response then fits
  prompt, out, pc, rc, why = examples.truncate(*ex(20, 10), row_len=16, max_prompt_length=4)
  assert prompt == [T.bos_id, 27, 28, 29] and len(out[0][0]) == 10 and (pc, rc) == (True, False)
  # still too long: the end of the response is cut
  prompt, out, pc, rc, why = examples.truncate(*ex(20, 30), row_len=16, max_prompt_length=4)
  assert out[0][0] == list(range(50, 62)) and (pc, rc, why) == (True, True, '')
  # a pair whose replies differ only after the cut is dropped
  p = [T.bos_id] + [9] * 3
  same = examples.truncate(p, [([5] * 12 + [6], [1] * 13), ([5] * 12 + [7], [1] * 13)], 16, 8)
  assert same[-1] == 'chosen = rejected after truncation'
  # a prompt allowed the whole row leaves the response nothing
  assert examples.truncate(*ex(20, 5), row_len=16, max_prompt_length=16)[-1] == (
      'response cut to nothing')


def test_encode_file_reports_kept_cut_dropped_and_skipped(tmp_path):
  path = tmp_path / 'p.jsonl'
  rows = [{'prompt': 'p' * 30, 'chosen': 'good', 'rejected': 'bad'},      # prompt cut
          {'prompt': 'q', 'chosen': 'a' * 40, 'rejected': 'b' * 40},      # responses cut
          {'prompt': 'r', 'chosen': 'x' * 30 + 'A', 'rejected': 'x' * 30 + 'B'},  # tie: dropped
          {'prompt': 's', 'chosen': 'same', 'rejected': 'same'},          # identical: dropped
          {'prompt': 't'},                                                # bad: skipped
          {'prompt': 'u', 'chosen': 'ok', 'rejected': 'no'}]              # kept as is
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  e = examples.Encoder(T)
  out, report = examples.encode_file(str(path), e.pair, row_len=24, max_prompt_length=8,
                                     skip_bad=True)
  assert len(out) == report.kept == 2 + 0 + 1 and report.records == 6
  assert (report.prompt_cut, report.response_cut, report.skipped) == (1, 1, 1)
  assert report.dropped == {'chosen = rejected after truncation': 1,
                            'chosen and rejected identical': 1}
  assert report.first_skipped.startswith(f'{path}:5: no field')
  assert report.as_metrics()['data/dropped'] == 2
  with pytest.raises(DataError, match=f'^{path}:5: no field .chosen.'):
    examples.encode_file(str(path), e.pair, row_len=24, max_prompt_length=8)


def test_held_out_split_is_a_fixed_share_by_content():
  records = [(f'f:{i}', {'n': i}) for i in range(40)]
  train, held = examples.split_records(records, 0.1)
  assert len(held) == 4 and len(train) == 36 and not {r['n'] for _, r in held} & {
      r['n'] for _, r in train}
  again = examples.split_records(list(reversed(records)), 0.1)[1]
  assert sorted(r['n'] for _, r in again) == sorted(r['n'] for _, r in held)  # order-free
  assert examples.split_records(records[:9], 0.1) == (records[:9], [])  # under 1 / fraction


def test_a_jinja_template_gets_the_tokenizers_special_tokens(tmp_path):
  template = ("{{ bos_token }}{% for m in messages %}{{ m.role }}: {{ m.content }}"
              "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'chat_template': template, 'bos_token': '^', 'eos_token': {'content': '$'}}))

  class SpecialTok(CharTok):  # like a tokenizers.Tokenizer: special strings are single ids
    path = str(tmp_path / 'tokenizer.json')

    def encode(self, text):
      return [{'^': self.bos_id, '$': self.eos_id}.get(c, 3 + ord(c)) for c in text]

  tok = SpecialTok()
  turns = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]
  prompt, ((response, mask),) = examples.Encoder(tok, template=chat.template_text('', tok)).sft(
      {'messages': turns})
  assert prompt == [T.bos_id] + enc('user: hi\nassistant: ')  # the template's bos, not a second
  assert response == enc('yo') + [T.eos_id] + enc('\n') and mask == [1] * 4
