"""The values an evaluation's settings take, in one place: the CLI offers them as its choices and
`EvalSettings` checks them (a config file or a script reaches it without the CLI). No torch here:
`micromerge --help` imports this module."""

PROTOCOLS = ("ubench", "closed-set")
PRECISIONS = ("bf16", "fp32")  # the image forward: bf16 autocast on a GPU, or fp32
PROMPTS = ("names", "captions")  # closed-set: class names in templates, or the class captions
