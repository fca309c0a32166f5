package doctor

import (
	"fmt"
	"net/http"
	"strings"
)

// checkAgentReady: the agent says itself whether it holds a lease, wrote
// subnet.env and programmed the data path (/readyz, with one line per
// readiness check). Not answering means it is down or crash-looping.
func checkAgentReady(f *Facts) Result {
	r := f.Ready
	if r.URL == "" {
		return skip("the agent's health server is off (-healthz-port 0): set -healthz-port so doctor (and Kubernetes) can read readiness")
	}
	if r.Err != nil {
		return fail(fmt.Sprintf("the agent does not answer at %s: %v", r.URL, r.Err),
			"start the agent, or read why it stopped (journalctl -u loom, kubectl logs, or its log file); pods keep working while it is down, but nothing is reconciled",
			"GET "+r.URL)
	}
	body := strings.Split(strings.TrimSpace(r.Body), "\n")
	ev := append([]string{fmt.Sprintf("GET %s: %d %s", r.URL, r.Status, http.StatusText(r.Status))}, body...)
	if r.Status != http.StatusOK {
		var failing []string
		for _, line := range body {
			if strings.HasPrefix(line, "[-]") {
				failing = append(failing, strings.TrimPrefix(line, "[-]"))
			}
		}
		return fail("the agent is not ready: "+strings.Join(orNone(failing), "; "),
			"read the agent's log; the lines above name the part that is not ready (lease, subnet.env, datapath)", ev...)
	}
	return ok("the agent is ready", ev...)
}
