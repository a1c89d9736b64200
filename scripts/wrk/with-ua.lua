-- scripts/wrk/with-ua.lua — a shared wrk script (BASE_LUA, e.g. ../shared/bench/wrk/event-zipf.lua)
-- with a User-Agent header on every request, in a realistic mix: about 600 browser builds
-- (Chrome, Edge, Safari, Firefox; a few carry most of the traffic), 4% crawlers and HTTP
-- libraries, 1% no agent. Used by scripts/floor.sh and scripts/bench-wrk.sh with UA=browser,
-- so the invalid-traffic checks see what pixels send.
dofile(assert(os.getenv("BASE_LUA"), "set BASE_LUA to the wrk script to wrap"))

local agents = {}
for major = 131, 112, -1 do
  for _, build in ipairs({0, 6099, 6261, 6367}) do
    local v = major .. ".0." .. build .. ".0"
    agents[#agents + 1] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/" .. v .. " Safari/537.36"
    agents[#agents + 1] = "Mozilla/5.0 (Linux; Android 10; K) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/" .. v .. " Mobile Safari/537.36"
    agents[#agents + 1] = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/" .. v .. " Safari/537.36"
    agents[#agents + 1] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/" .. v .. " Safari/537.36 Edg/" .. v
  end
end
for ios = 15, 18 do
  for minor = 0, 6 do
    agents[#agents + 1] = "Mozilla/5.0 (iPhone; CPU iPhone OS " .. ios .. "_" .. minor .. " like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/" .. ios .. "." .. minor .. " Mobile/15E148 Safari/604.1"
    agents[#agents + 1] = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/" .. ios .. "." .. minor .. " Safari/605.1.15"
  end
end
for ff = 100, 133 do
  agents[#agents + 1] = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:" .. ff .. ".0) Gecko/20100101 Firefox/" .. ff .. ".0"
end
local bots = {
  "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
  "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
  "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
  "curl/8.5.0",
  "python-requests/2.31.0",
}
-- The header lines, built once.
local lines = {}
for i, a in ipairs(agents) do lines[i] = "\r\nUser-Agent: " .. a .. "\r\nContent-Length" end
local bot_lines = {}
for i, a in ipairs(bots) do bot_lines[i] = "\r\nUser-Agent: " .. a .. "\r\nContent-Length" end

local base_request = request
local random = math.random
function request()
  local r = base_request()
  local u = random()
  if u < 0.01 then return r end
  local line
  if u < 0.05 then
    line = bot_lines[random(#bot_lines)]
  else
    -- Skewed towards the first (newest) builds, as real traffic is.
    line = lines[math.floor(#lines * random() ^ 3) + 1]
  end
  return (r:gsub("\r\nContent%-Length", line, 1))
end
