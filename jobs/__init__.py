"""Jobs: the SQLite registry of trainings and exports with their events (`registry`), and the
executor that runs each job in a supervised child process (`runner`, whose child is
`python -m jobs.runner run JOB_ID`).

Owns job state and job processes. Knows nothing of HTTP: the routes in api/ call it.
"""
