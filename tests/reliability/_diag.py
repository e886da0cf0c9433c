from collections import Counter
from datacreator.bus.codec import decode
from datacreator.bus.readback import read_to_end
from datacreator.contracts import PlannerSnapshot, GenerationTask, Candidate, TaskOutcome

async def diagnose(settings, request_id):
    t = settings.topics
    snaps = []
    async for r in read_to_end(settings, t.planner_state):
        snaps.append(decode(PlannerSnapshot, r.value))
    last = snaps[-1].plan
    inflight = set(last["in_flight"])
    print("snapshots", len(snaps), "state", last["state"], "accepted", last["counts"]["accepted"], "in_flight", len(inflight))
    tasks = Counter(); cands = Counter(); outs = Counter()
    async for r in read_to_end(settings, t.tasks):
        tasks[decode(GenerationTask, r.value).task_id] += 1
    async for r in read_to_end(settings, t.candidates):
        cands[decode(Candidate, r.value).task.task_id] += 1
    async for r in read_to_end(settings, t.outcomes):
        outs[decode(TaskOutcome, r.value).task_id] += 1
    print("tasks", len(tasks), "cands", len(cands), "outs", len(outs))
    for tid in inflight:
        print(" inflight", tid, "task", tasks[tid], "cand", cands[tid], "out", outs[tid], last["in_flight"][tid]["chain"], last["in_flight"][tid]["step"])
