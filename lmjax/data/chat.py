"""Chat templates: a list of `{"role", "content"}` messages as tokens, with the assistant turns
marked.

`encode_chat(tok, messages, template)` returns `(message index, tokens, is_assistant)` segments in
order (index -1: the leading BOS token). Two templates:
  lmjax's default   `[bos]` then per message `<|ROLE|>\\n` and its content: an assistant turn ends
                    with the eos token, any other turn with a newline. The `<|assistant|>\\n` header
                    is context; the reply and its eos are the assistant segment.
  a Jinja template  a converted Hugging Face model's own `chat_template` (tokenizer_config.json next
                    to its tokenizer.json), or the file `post.chat_template` names. Each message's
                    text is what rendering one more message adds; an assistant message's
                    generation prompt (`add_generation_prompt`) is context, the rest is its reply.
`post.chat_template`: '' = the tokenizer's own template if it has one, else lmjax's default;
'default' = lmjax's default; otherwise a path to a Jinja file or a tokenizer_config.json.
"""

from __future__ import annotations

import functools
import json
import os

from lmjax.data.jsonl import DataError

DEFAULT = 'default'


def default_segments(tok, messages) -> list[tuple[int, list[int], bool]]:
  """lmjax's template (see the module docstring): header + body segments per message."""
  segments = [(-1, [tok.bos_id], False)]
  for i, m in enumerate(messages):
    role, content = m['role'], m['content']
    segments.append((i, tok.encode(f'<|{role}|>\n'), False))
    if role == 'assistant':
      segments.append((i, tok.encode(content) + [tok.eos_id], True))
    else:
      segments.append((i, tok.encode(content + '\n'), False))
  return segments


@functools.lru_cache(maxsize=8)
def _compile(source: str):
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise DataError(f'chat template: {message}')

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals['raise_exception'] = raise_exception
  return env.from_string(source)


def template_text(setting: str, tok) -> str:
  """The Jinja source for `post.chat_template` = `setting` and this tokenizer, or '' (default)."""
  if setting == DEFAULT:
    return ''
  path = setting
  if not setting:
    tok_path = getattr(tok, 'path', '') or ''
    path = os.path.join(os.path.dirname(tok_path), 'tokenizer_config.json')
    if not tok_path.endswith('.json') or not os.path.isfile(path):
      return ''
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise DataError(f'post.chat_template: cannot read {path}: {e.strerror or e}') from None
  if path.endswith('.json'):
    try:
      template = json.loads(text).get('chat_template') or ''
    except (json.JSONDecodeError, AttributeError):
      raise DataError(f'post.chat_template: {path} is not a tokenizer_config.json') from None
    if isinstance(template, list):  # several named templates: the default one
      template = next((t['template'] for t in template if t.get('name') == 'default'), '')
    if not template and setting:
      raise DataError(f'post.chat_template: {path} has no chat_template')
    return template
  return text


@functools.lru_cache(maxsize=8)
def _special_tokens(tok_path: str) -> dict:
  """bos_token / eos_token strings of the tokenizer_config.json next to a tokenizer.json."""
  path = os.path.join(os.path.dirname(tok_path), 'tokenizer_config.json')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError):
    return {}
  text = lambda v: v.get('content', '') if isinstance(v, dict) else (v or '')
  return {k: text(config.get(k)) for k in ('bos_token', 'eos_token')}


def _render(template, tok, messages, generation_prompt: bool) -> str:
  special = _special_tokens(getattr(tok, 'path', '') or '')
  return template.render(messages=messages, add_generation_prompt=generation_prompt,
                         bos_token=special.get('bos_token', ''),
                         eos_token=special.get('eos_token', ''))


def jinja_segments(source: str, tok, messages) -> list[tuple[int, list[int], bool]]:
  """Segments of a Jinja chat template (see the module docstring)."""
  template = _compile(source)
  segments, done = [], ''
  for i, m in enumerate(messages):
    pieces = []
    if m['role'] == 'assistant':
      header = _render(template, tok, messages[:i], True)
      pieces.append((header, False))
    full = _render(template, tok, messages[:i + 1], False)
    pieces.append((full, m['role'] == 'assistant'))
    for text, assistant in pieces:
      if not text.startswith(done):
        raise DataError('chat template: rendering one more message changed the text before it; '
                        "set post.chat_template=default to use lmjax's template")
      segments.append((i, tok.encode(text[len(done):]), assistant))
      done = text
  first = segments[0][1] if segments else []
  if not first or first[0] != tok.bos_id:
    segments.insert(0, (-1, [tok.bos_id], False))
  return segments


def encode_chat(tok, messages, template: str = '') -> list[tuple[int, list[int], bool]]:
  """(message index, tokens, is_assistant) segments; `template` is Jinja source, '' =
  lmjax's default."""
  if template:
    return jinja_segments(template, tok, messages)
  return default_segments(tok, messages)
