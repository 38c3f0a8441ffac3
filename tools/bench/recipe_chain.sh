#!/usr/bin/env bash
# Run several recipes of configs/grpo/ one after another through tools/bench/recipe_run.py, detached from the
# calling shell, so that later device calls on the same warm machine only poll. Each spec is
# "recipe|preset|name|extra prepare arguments"; results (report JSON, samples, log) land in ROOT/results.
#   setsid nohup bash tools/bench/recipe_chain.sh ROOT SPEC... > ROOT.log 2>&1 &
#   (then: tail ROOT.log; "chain finished" ends it)
set -u
root=$1
shift
mkdir -p "$root/results"
for spec in "$@"; do
    IFS='|' read -r recipe preset name extra <<<"$spec"
    work=$root/$name
    echo "$(date -u +%T) $name: prepare $recipe ($preset) $extra"
    # shellcheck disable=SC2086  # extra holds several arguments
    if ! python3 tools/bench/recipe_run.py prepare "$recipe" --work "$work" --preset "$preset" $extra; then
        echo "$(date -u +%T) $name: prepare failed"
        continue
    fi
    python3 tools/bench/recipe_run.py launch --work "$work"
    until [[ -f $work/exit.json ]]; do sleep 5; done
    python3 tools/bench/recipe_run.py report --work "$work" --out "$root/results/$name.json"
    cp "$work/samples.csv" "$root/results/${name}_samples.csv"
    cp "$work/train.log" "$root/results/${name}_train.log"
    echo "$(date -u +%T) $name: exit $(cat "$work/exit.json")"
done
echo "$(date -u +%T) chain finished"
