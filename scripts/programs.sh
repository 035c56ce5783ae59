#!/usr/bin/env bash
# Runs real programs under glibc's malloc and under coreheap (LD_PRELOAD), interleaved, and
# prints the median wall time and median peak RSS of each, with coreheap/glibc ratios.
# Usage: scripts/programs.sh [RUNS] [PROGRAM...]   (needs a release build:
# cargo build --release --workspace). Programs: python-dicts sqlite3-index sort gcc perl-hash.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
shift || true
lib=$PWD/target/release/libcoreheap_preload.so
[ -f "$lib" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Inputs.
python3 - "$work/sort.txt" <<'PY'
import random, sys
random.seed(1)
with open(sys.argv[1], "w") as f:
    for _ in range(2_000_000):
        f.write("%x %d\n" % (random.getrandbits(64), random.randrange(1000)))
PY
cat > "$work/big.c" <<'C'
#include <stdio.h>
#define F(n) int f##n(int x) { int a[64]; for (int i = 0; i < 64; i++) a[i] = x * i + n; \
  int s = 0; for (int i = 0; i < 64; i++) s += a[i] % (n + 3); return s; }
#define G(n) F(n##0) F(n##1) F(n##2) F(n##3) F(n##4) F(n##5) F(n##6) F(n##7) F(n##8) F(n##9)
#define H(n) G(n##0) G(n##1) G(n##2) G(n##3) G(n##4) G(n##5) G(n##6) G(n##7) G(n##8) G(n##9)
H(1) H(2)
int main(void) { printf("%d\n", f100(1) + f299(2)); return 0; }
C
py_dicts='
d = {}
for i in range(1500000):
    k = "key-%d-%s" % (i, "x" * (i % 40))
    d[k] = [str(i)] * (i % 7) + [k.upper()]
for k in list(d)[::3]:
    del d[k]
print(len(d))'
sql="create table t(id integer primary key, name text, v integer);
with recursive c(x) as (select 1 union all select x+1 from c where x < 1000000)
insert into t(name, v) select 'name-' || x, (x * 7919) % 100003 from c;
create index t_v on t(v); create index t_name on t(name); select count(*) from t;"
perl_hash='my %h; for my $i (1..1500000) { $h{"k$i"} = "v" x ($i % 30); } print scalar(keys %h), "\n";'

names=(python-dicts sqlite3-index sort gcc perl-hash)
[ $# -gt 0 ] && names=("$@")
cmd_for() {
    case $1 in
        python-dicts) echo "env PYTHONMALLOC=malloc /usr/bin/python3 -c \"\$py_dicts\"" ;;
        sqlite3-index) echo "sqlite3 :memory: \"\$sql\"" ;;
        sort) echo "env LC_ALL=C sort $work/sort.txt -o $work/sorted.txt" ;;
        gcc) echo "gcc -O2 -c $work/big.c -o $work/big.o" ;;
        perl-hash) echo "perl -e \"\$perl_hash\"" ;;
    esac
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf "%-14s %10s %10s %7s %10s %10s %7s\n" program "glibc s" "coreheap s" ratio "glibc MiB" "ch MiB" ratio
for name in "${names[@]}"; do
    c=$(cmd_for "$name")
    : > "$work/g"; : > "$work/c"
    for _ in $(seq "$runs"); do
        eval "/usr/bin/time -f '%e %M' -o $work/t $c" >/dev/null 2>&1 ||
            { echo "$name failed under glibc" >&2; exit 1; }
        cat "$work/t" >> "$work/g"
        eval "LD_PRELOAD=$lib /usr/bin/time -f '%e %M' -o $work/t $c" >/dev/null 2>&1 ||
            { echo "$name failed under coreheap" >&2; exit 1; }
        cat "$work/t" >> "$work/c"
    done
    gt=$(awk '{print $1}' "$work/g" | median); ct=$(awk '{print $1}' "$work/c" | median)
    gm=$(awk '{print $2}' "$work/g" | median); cm=$(awk '{print $2}' "$work/c" | median)
    awk -v n="$name" -v gt="$gt" -v ct="$ct" -v gm="$gm" -v cm="$cm" 'BEGIN {
        printf "%-14s %10.2f %10.2f %7.2f %10.1f %10.1f %7.2f\n", n, gt, ct, ct/gt, gm/1024, cm/1024, cm/gm }'
done
