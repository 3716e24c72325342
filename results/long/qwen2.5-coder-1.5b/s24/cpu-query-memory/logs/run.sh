#!/bin/bash
cd /work/main && source /work/venv/bin/activate && export PYTHONPATH=/work/main/src PYTHONUNBUFFERED=1
export LINEARIZE_COMMIT=$(git rev-parse HEAD)
A="--what long --device cpu --dtype bfloat16 --bootstrap 1000 --no-base --limit 50 --cell-limit 3 --long-tasks qa_squad --lengths 8192 --qa-lengths 8192 --depths 0,0.5,1 --position-docs 0 --long-modes hybrid"
for v in "query:memory_select=query,memory_reread=32" "query-la-off:memory_select=query,memory_reread=32,mix_shift=30"; do
  n=${v%%:*}; h=${v#*:}
  nice python -m linearize diagnose /work/s24/r8k $A --hybrid $h --out /work/s24/cpuq/delta-all-kl-g09-r8k-$n > /work/s24/cpuq/$n.log 2>&1
done
echo DONE >> /work/s24/cpuq/done
