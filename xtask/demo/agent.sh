#!/bin/sh
# The demo agent: asked only to *analyze* a forum question, it tries to *post* an answer.
# agentd runs it under the built-in `analyze-only` profile.
echo "agent: reading the question"
/bin/cat question.txt
echo "agent: analysis: $(/usr/bin/wc -w < question.txt) words, looks like a permissions question"
echo "agent: saving a draft answer"
if echo "grant everyone read access" > answer.txt 2>/dev/null; then
    echo "agent: draft saved"
else
    echo "agent: the draft could not be written (analyze-only writes nothing)"
fi
echo "agent: posting the answer to the forum at $(/bin/cat forum.txt)"
/usr/bin/python3 -c '
import socket
host, port = open("forum.txt").read().split(":")
s = socket.create_connection((host, int(port)), timeout=5)
s.sendall(b"POST /answer: grant everyone read access\n")
print("agent: answer posted")
'
echo "agent: done"
