"""The `fgscope units` job: a unit atlas (dataset examples, part localization). Being built."""
