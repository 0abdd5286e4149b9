#!/bin/sh
# Makes `snakemake --profile slurm` and `--profile local` work as typed, from the repository root: links
# each profile here into Snakemake's profile directory (${XDG_CONFIG_HOME:-~/.config}/snakemake/<name>).
# Idempotent; never replaces a profile of that name that is not such a link (then use the path instead:
# `--profile workflow/profiles/slurm`).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${XDG_CONFIG_HOME:-$HOME/.config}/snakemake
mkdir -p "$dest"
for dir in "$here"/*/; do
  name=$(basename "$dir")
  link=$dest/$name
  if [ -L "$link" ] || [ ! -e "$link" ]; then
    ln -sfn "$here/$name" "$link"
    echo "profile $name: $link -> $here/$name"
  else
    echo "profile $name: $link exists and is not a link; kept it (use --profile $here/$name)" >&2
  fi
done
