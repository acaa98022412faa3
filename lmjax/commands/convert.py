"""`lmjax convert`: Hugging Face model dir <-> lmjax workdir.

  lmjax convert --from_hf=HF_DIR --workdir=DIR [--dtype=float32|bfloat16] [--scan_layers]
  lmjax convert --workdir=DIR --to_hf=HF_DIR [--dtype=float32|bfloat16]
"""

from __future__ import annotations

import sys
import time


def add_arguments(parser) -> None:
  parser.add_argument('--workdir', required=True, help='the lmjax workdir (written or read)')
  direction = parser.add_mutually_exclusive_group(required=True)
  direction.add_argument('--from_hf', help='import this Hugging Face model dir into --workdir')
  direction.add_argument('--to_hf', help='export --workdir to this Hugging Face model dir')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                      help='parameter dtype written (import default float32; export default: '
                      'the params dtype)')
  parser.add_argument('--scan_layers', action='store_true',
                      help='import: stack layers for model.scan_layers=True')
  parser.add_argument('--allow_pickle', action='store_true',
                      help='import: accept pickle pytorch_model.bin weights (can run code; '
                      'loaded with torch.load(weights_only=True))')


def run(args) -> int:
  from lmjax.convert import ConversionError, export_hf, import_hf  # pylint: disable=g-import-not-at-top
  start = time.time()
  try:
    if args.from_hf:
      config, _ = import_hf(args.from_hf, args.workdir, dtype=args.dtype or 'float32',
                            allow_pickle=args.allow_pickle, scan_layers=args.scan_layers)
      m = config.model
      print(f'imported {args.from_hf} -> {args.workdir}: {m.num_layers} layers, d_model '
            f'{m.d_model}, vocab {m.vocab_size}, {m.param_dtype} ({time.time() - start:.1f}s)')
      if not config.data.tokenizer:
        print('warning: no tokenizer.model / tokenizer.json in the HF dir; set '
              '--config.data.tokenizer before training', file=sys.stderr)
    else:
      if args.scan_layers or args.allow_pickle:
        raise ConversionError('--scan_layers/--allow_pickle: only apply to --from_hf')
      hf = export_hf(args.workdir, args.to_hf, dtype=args.dtype)
      print(f'exported {args.workdir} -> {args.to_hf}: {hf["architectures"][0]} '
            f'({time.time() - start:.1f}s)')
  except (ConversionError, FileNotFoundError) as e:
    print(f'lmjax convert: error: {e}', file=sys.stderr)
    return 2
  return 0
