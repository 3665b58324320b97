#!/bin/sh
cat /app/message.txt
echo "built on a remote builder by absconda"
