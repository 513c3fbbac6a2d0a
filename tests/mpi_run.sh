#!/bin/sh
# mpi_run.sh NP PROGRAM [ARGS...] - runs PROGRAM on NP MPI processes of this
# machine (Open MPI's mpirun; as root and with more processes than cores,
# as the README's command does).  A rank that exits non-zero ends the job
# with a non-zero status.
set -eu
np=$1
shift
exec mpirun --allow-run-as-root --oversubscribe -np "$np" "$@"
