#!/bin/sh
# mpi_run.sh NP PROGRAM [ARGS...] - runs PROGRAM on NP MPI processes of this
# machine (Open MPI's mpirun; as root and with more processes than cores,
# as the README's command does).  A rank that exits non-zero ends the job
# with a non-zero status.
# Single-copy transfers between processes (Linux CMA) are off: containers
# without ptrace rights fail them, and the tests move little data.
set -eu
np=$1
shift
export OMPI_MCA_btl_vader_single_copy_mechanism=none
exec mpirun --allow-run-as-root --oversubscribe -np "$np" "$@"
