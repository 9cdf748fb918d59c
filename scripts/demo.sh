#!/usr/bin/env bash
# The newcomer flow with curl against a running stack (`make run` in another terminal):
# photo -> avatar (light fine-tune) -> poll -> reenact the sample driver -> save the MP4.
#
#   LPD_API_KEY=lpd_... scripts/demo.sh            # the key `make run` printed
#   API=http://host:8000 PHOTO=me.jpg DRIVER=talk.mp4 OUT=me.mp4 scripts/demo.sh
set -euo pipefail

API=${API:-http://127.0.0.1:8000}
KEY=${LPD_API_KEY:?set LPD_API_KEY to the API key that make run printed}
PHOTO=${PHOTO:-samples/photo.jpg}
DRIVER=${DRIVER:-samples/driver.mp4}
OUT=${OUT:-reenacted.mp4}
STEPS=${STEPS:-20}
AUTH=(-H "Authorization: Bearer $KEY")

call() {  # curl that prints the typed error body and stops on a 4xx/5xx
  local body status
  body=$(curl -sS -w '\n%{http_code}' "${AUTH[@]}" "$@")
  status=${body##*$'\n'}
  body=${body%$'\n'*}
  if [[ $status -ge 400 ]]; then
    echo "HTTP $status: $body" >&2
    exit 1
  fi
  printf '%s' "$body"
}

wait_job() {  # poll a job until it finishes; print progress on one line
  local job status
  while true; do
    job=$(call "$API/v1/jobs/$1")
    status=$(jq -r .status <<<"$job")
    printf '\r  %-9s %3.0f%%  %-20s' "$status" "$(jq -r '.progress * 100' <<<"$job")" \
      "$(jq -r '.stage // ""' <<<"$job")" >&2
    case $status in
      succeeded) echo >&2; printf '%s' "$job"; return ;;
      failed | canceled) echo >&2; echo "job $status: $(jq -c .error <<<"$job")" >&2; exit 1 ;;
    esac
    sleep 1
  done
}

echo "1. avatar from $PHOTO (light fine-tune, $STEPS steps)" >&2
created=$(call -F "photos=@$PHOTO" -F fine_tune=light -F "steps=$STEPS" -F name=demo "$API/v1/avatars")
avatar=$(jq -r .avatar.id <<<"$created")
wait_job "$(jq -r .job.id <<<"$created")" >/dev/null

echo "2. reenact $DRIVER with avatar $avatar" >&2
job=$(call -F "avatar_id=$avatar" -F "video=@$DRIVER" -F paste_back=false "$API/v1/reenactments")
done_job=$(wait_job "$(jq -r .id <<<"$job")")

echo "3. download -> $OUT (and the matte -> ${OUT%.*}.mask.mp4)" >&2
curl -sSf "${AUTH[@]}" -o "$OUT" "$API$(jq -r .result.video <<<"$done_job")"
curl -sSf "${AUTH[@]}" -o "${OUT%.*}.mask.mp4" "$API$(jq -r .result.mask <<<"$done_job")"
echo "done: $(jq -r .result.frames <<<"$done_job") frames at $(jq -r .result.fps <<<"$done_job") fps; signed link (no key needed): $API$(jq -r .result.video_url <<<"$done_job")" >&2
