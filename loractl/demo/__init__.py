"""`loractl demo`: the whole loop on one machine, through a real Envoy.

scene.py writes the state directory (adapters and the object YAMLs a cluster would hold);
stack.py starts and stops the processes; workload.py is the client; report.py turns what
was seen into the live view and the summary; cli.py runs the story.
"""
