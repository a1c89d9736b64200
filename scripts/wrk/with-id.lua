-- scripts/wrk/with-id.lua — wraps a wrk script (ID_BASE_LUA) and adds a fresh random
-- event_id (a version-4 UUID) to every request's query string, as an SDK that makes its
-- events idempotent does. Used by scripts/floor.sh and scripts/bench-wrk.sh with EVENT_ID=1.
dofile(assert(os.getenv("ID_BASE_LUA"), "set ID_BASE_LUA to the wrk script to wrap"))

local random, format = math.random, string.format
local function uuid4()
  return format("%04x%04x-%04x-4%03x-%04x-%04x%04x%04x",
    random(0, 0xffff), random(0, 0xffff), random(0, 0xffff), random(0, 0xfff),
    random(0x8000, 0xbfff), random(0, 0xffff), random(0, 0xffff), random(0, 0xffff))
end

local base_request = request
function request()
  local r = base_request()
  return (r:gsub(" HTTP/1%.1\r\n", "&event_id=" .. uuid4() .. " HTTP/1.1\r\n", 1))
end
