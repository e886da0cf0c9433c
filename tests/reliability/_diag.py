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
    prev = None
    for i, sn in enumerate(snaps):
        c = sn.plan["counts"]
        cur = (c["llm_calls"], c["tasks_issued"])
        print("  snap", i, cur, sorted(x[:6] for x in sn.plan["in_flight"]), round(sn.created_at % 1000, 2))
        prev = cur
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

async def offsets(settings, procs):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka import AIOKafkaConsumer, TopicPartition
    admin = AIOKafkaAdminClient(**settings.kafka_kwargs())
    await admin.start()
    try:
        for g in ("datacreator-planner", "datacreator-curator", "datacreator-generator"):
            try:
                print(g, {f"{tp.topic.split('.')[-1]}[{tp.partition}]": m.offset for tp, m in (await admin.list_consumer_group_offsets(g)).items()})
            except Exception as e:
                print(g, "offsets?", e)
    finally:
        await admin.close()
    c = AIOKafkaConsumer(**settings.kafka_kwargs())
    await c.start()
    try:
        for topic in (settings.topics.outcomes, settings.topics.requests, settings.topics.candidates, settings.topics.tasks):
            tps = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
            print(topic, await c.end_offsets(tps))
    finally:
        await c.stop()
    for p in procs:
        try:
            m = await p.metrics()
            print(p.label, [l for l in m.splitlines() if l.startswith("datacreator_consumer_lag") or l.startswith("datacreator_in_flight")])
        except Exception as e:
            print(p.label, e)
