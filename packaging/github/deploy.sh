#!/usr/bin/env bash
# Step 2 of the Slipway deploy action (action.yml): `slipway deploy --oidc
# --wait --json` with the action's inputs (as DEPLOY_* / SLIPWAY_* variables),
# then the outputs (deployment-id, result, release-id) to GITHUB_OUTPUT and a
# table of every node's outcome to GITHUB_STEP_SUMMARY. Exits with the CLI's
# code, so a failed node fails the step.
set -euo pipefail

: "${SLIPWAY_CONTROLLER:?the controller input is required}"
: "${SLIPWAY_CA_PEM:?the ca input is required (the controller CA certificate, PEM)}"
: "${DEPLOY_APP:?the app input is required}"
: "${DEPLOY_ARTIFACT:?the artifact input is required}"
: "${GITHUB_OUTPUT:?GITHUB_OUTPUT is not set: run this in a GitHub Actions job}"
summary=${GITHUB_STEP_SUMMARY:-/dev/null}

work=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/slipway-deploy.XXXXXX")
trap 'rm -rf "$work"' EXIT
printf '%s\n' "$SLIPWAY_CA_PEM" >"$work/ca.pem"
export SLIPWAY_CA="$work/ca.pem"
# The token comes from the Actions runtime, never from a stored secret.
unset SLIPWAY_TOKEN

args=(deploy "$DEPLOY_APP" "$DEPLOY_ARTIFACT" --oidc --wait --json)
add() { if [ -n "$2" ]; then args+=("$1" "$2"); fi; }
add --id "${DEPLOY_RELEASE_ID:-}"
add --git-sha "${DEPLOY_GIT_SHA:-}"
add --strategy "${DEPLOY_STRATEGY:-}"
add --max-parallel "${DEPLOY_MAX_PARALLEL:-}"
add --max-unavailable "${DEPLOY_MAX_UNAVAILABLE:-}"
add --canary "${DEPLOY_CANARY:-}"
add --tag "${DEPLOY_TAG:-}"
add --node "${DEPLOY_NODE:-}"

echo "slipway ${args[*]}"
set +e
slipway "${args[@]}" >"$work/result.json" 2>"$work/stderr"
code=$?
set -e
cat "$work/stderr" >&2

deployment_id=$(jq -r '.deployment_id // ""' "$work/result.json" 2>/dev/null || true)
release_id=$(jq -r '.release_id // ""' "$work/result.json" 2>/dev/null || true)
if [ "$code" = 0 ]; then
  result=succeeded
elif [ -n "$deployment_id" ]; then
  result=failed
else
  result=error
fi
{
  echo "deployment-id=$deployment_id"
  echo "result=$result"
  echo "release-id=$release_id"
} >>"$GITHUB_OUTPUT"

{
  echo "### Slipway deploy of \`$DEPLOY_APP\`: $result"
  echo
  if [ -n "$deployment_id" ]; then
    echo "Deployment \`$deployment_id\`, release \`$release_id\`."
    echo
    echo "| Node | Outcome | Release | Message |"
    echo "| --- | --- | --- | --- |"
    jq -r '.nodes[] | "| \(.node_name) | \(.outcome) | \(.release_id) | \(.message | gsub("\\|"; "\\\\|") | gsub("\n"; " ")) |"' \
      "$work/result.json"
  else
    echo '```'
    tail -n 20 "$work/stderr"
    echo '```'
  fi
} >>"$summary"

if [ "$code" != 0 ]; then
  echo "::error title=slipway deploy::$DEPLOY_APP: $result (exit $code)" >&2
fi
exit "$code"
