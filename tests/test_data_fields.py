"""lmjax.data.fields: the one field-mapping mechanism (post.fields, eval data)."""

import pytest

from lmjax.config import ConfigError
from lmjax.data.fields import (PREFERENCE_FIELDS, FieldMap, lookup, require_messages,
                               require_str)
from lmjax.data.jsonl import DataError


def test_parse_and_apply_maps_names_and_nested_paths():
  fmap = FieldMap.parse(' prompt=question , chosen=answers.0.text,rejected=bad', PREFERENCE_FIELDS)
  record = {'question': 'Q', 'answers': [{'text': 'A'}, {'text': 'B'}], 'bad': 'C', 'x': 1}
  out = fmap.apply(record)
  assert (out['prompt'], out['chosen'], out['rejected'], out['x']) == ('Q', 'A', 'C', 1)
  assert 'prompt' not in record  # the input is not modified
  assert FieldMap().apply(record) is record  # no mapping: the record as it is
  assert lookup(record, 'answers.1.text') == 'B'


@pytest.mark.parametrize('spec, words', [
    ('prompt', 'NAME=SOURCE'), ('prompt=', 'NAME=SOURCE'), ('answer=x', "unknown field 'answer'"),
    ('prompt=a,prompt=b', 'mapped twice')])
def test_bad_mappings_are_config_errors_naming_the_key(spec, words):
  with pytest.raises(ConfigError, match='post.fields') as e:
    FieldMap.parse(spec, PREFERENCE_FIELDS)
  assert words in str(e.value) and '\n' not in str(e.value)


def test_missing_and_mistyped_fields_name_the_mapping():
  fmap = FieldMap.parse('prompt=question', PREFERENCE_FIELDS)
  with pytest.raises(DataError, match=r"no field 'question' \(post.fields prompt=question\); "
                                      'the record has fields chosen'):
    fmap.apply({'chosen': 'a'})
  with pytest.raises(DataError, match='expected a JSON object'):
    fmap.apply(['a'])
  with pytest.raises(DataError, match="field 'question' .*expected a string; got int"):
    require_str(fmap.apply({'question': 3}), 'prompt', fmap)
  with pytest.raises(DataError, match=r"field 'messages'\[1\]: expected"):
    require_messages({'messages': [{'role': 'user', 'content': 'a'}, {'role': 'user'}]})
  assert require_messages({'messages': [{'role': 'user', 'content': 'a'}]})[0]['content'] == 'a'
