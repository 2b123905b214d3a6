"""Submission of bfly training to SLURM with submitit: `python -m launch.submit --help`.

cluster_args: the command line; executor: submitit set-up and the sbatch text; job: what each
task runs; submit: the entry point. The plain sbatch scripts are in slurm/.
"""
