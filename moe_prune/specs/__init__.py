"""One typed spec per stage: the stage's library signature, its CLI options, its recorded step and its resume
fingerprint, read off the same dataclass fields (`specs.fields`); shared option groups in `specs.groups`."""
