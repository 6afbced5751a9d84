# Sourced by the device scripts: the environment every device step runs in, from the repository root.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The carried data (scripts/device_pipeline.sh carry): the full set, else the texts and tokenizer alone.
[ -d "$PWD/.carry/data" ] && data=$PWD/.carry/data || data=$PWD/.carry/lite
export ANY4_DATA=${ANY4_DATA:-$data} ANY4_CACHE=${ANY4_CACHE:-/tmp/any4_cache}
for site in "$PWD"/.whl/*/; do  # the carried packages (scripts/device_wheels.sh)
  [ -d "$site" ] && export PYTHONPATH=${site%/}:$PYTHONPATH
done
