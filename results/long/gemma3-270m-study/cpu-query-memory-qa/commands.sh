set -x
cd REPO
export PYTHONPATH=src
C="--what long --long-tasks qa_squad --qa-lengths 8192 --cell-limit 3 --depths 0,0.5,1 --device cpu --dtype bfloat16 --position-docs 0"
python3 -m linearize diagnose gemma3-270m $C --layers global --window 512 --baselines-only --baseline-windows 512 --memory-baselines 2048 --out OUT/base-memory-2048
python3 -m linearize diagnose RUN $C --no-base --long-modes hybrid --hybrid sparse_memory=2048,memory_select=query,mix_shift=1 --out OUT/mem2048-query-shift1
python3 -m linearize diagnose RUN $C --no-base --long-modes hybrid --hybrid sparse_memory=2048,memory_select=query,mix_shift=30 --out OUT/mem2048-query-la-off
echo done
python3 -m linearize diagnose RUN $C --no-base --long-modes hybrid --hybrid sparse_memory=2048,memory_select=query,mix_shift=1,memory_reread=32 --out OUT/mem2048-query-shift1-reread32
python3 -m linearize diagnose RUN $C --no-base --long-modes hybrid --hybrid sparse_memory=256,memory_select=query,mix_shift=1,memory_reread=32 --out OUT/mem256-query-shift1-reread32
python3 -m linearize diagnose gemma3-270m $C --layers global --window 512 --baseline-windows "" --memory-baselines 256 --memory-reread 32 --out OUT/base-and-memory-256-reread32
python3 -m linearize diagnose RUN $C --no-base --long-modes hybrid --hybrid sparse_memory=256,memory_select=query,mix_shift=30,memory_reread=32 --out OUT/mem256-query-la-off-reread32
