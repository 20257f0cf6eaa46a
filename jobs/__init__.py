"""Jobs: the SQLite registry of trainings and exports with their events (`registry`), and the
executors that run each job: a supervised child process (`runner`, whose child is
`python -m jobs.runner run JOB_ID`), or a job on a Ray cluster (`cluster`, EXECUTOR=ray, whose
worker reports through `report` lines instead of the registry).

Owns job state and job processes. Knows nothing of HTTP: the routes in api/ call it.
"""
