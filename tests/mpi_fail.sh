#!/bin/sh
# mpi_fail.sh MPI_RUN TEST_COMM - a rank that fails ends the whole job: rank
# 1 of 3 exits with status 3 at once while the others start their
# collectives; mpirun must end the job with a non-zero status (the meson
# timeout would catch a hang; nothing here is timed).
set -u
run=$1
prog=$2
out=$(CCR_TEST_COMM_FAIL_RANK=1 "$run" 3 "$prog" 2>&1)
rc=$?
if [ "$rc" -eq 0 ]; then
  echo "mpi_fail: the job exited 0 although rank 1 failed"; echo "$out"; exit 1
fi
echo "$out" | grep -q "rank 1 exits with status 3 on purpose" ||
  { echo "mpi_fail: rank 1's message is missing"; echo "$out"; exit 1; }
echo "mpi_fail: the job ended with status $rc after rank 1 failed"
