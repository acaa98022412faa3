#!/usr/bin/env python
"""Convert between Hugging Face model dirs and lmjax workdirs (same as `lmjax convert`).

  python tools/convert_hf.py --from_hf=HF_DIR --workdir=DIR [--dtype=bfloat16]
  python tools/convert_hf.py --workdir=DIR --to_hf=HF_DIR
"""

import argparse
import sys

from lmjax.commands import convert


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  convert.add_arguments(parser)
  return convert.run(parser.parse_args(argv))


if __name__ == '__main__':
  sys.exit(main())
