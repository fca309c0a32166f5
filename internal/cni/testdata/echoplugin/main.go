// Command echoplugin is a chained CNI plugin for tests. It stands where
// portmap would stand after loom-cni in a conflist: on ADD it records the
// configuration it received (prevResult included) in <recordDir>/<CNI_CONTAINERID>
// and passes prevResult on as its own result. Every other command succeeds
// and does nothing. It uses only the standard library, so it builds
// without the CNI module.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

func main() {
	if err := run(); err != nil {
		fmt.Printf(`{"cniVersion":"1.0.0","code":999,"msg":%q}`+"\n", err.Error())
		os.Exit(1)
	}
}

func run() error {
	switch os.Getenv("CNI_COMMAND") {
	case "VERSION":
		fmt.Println(`{"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}`)
		return nil
	case "ADD":
	default:
		return nil
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	var conf struct {
		CNIVersion string         `json:"cniVersion"`
		RecordDir  string         `json:"recordDir"`
		PrevResult map[string]any `json:"prevResult"`
	}
	if err := json.Unmarshal(stdin, &conf); err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return fmt.Errorf("no prevResult: echoplugin must follow another plugin")
	}
	if err := os.WriteFile(filepath.Join(conf.RecordDir, os.Getenv("CNI_CONTAINERID")), stdin, 0o600); err != nil {
		return err
	}
	conf.PrevResult["cniVersion"] = conf.CNIVersion
	return json.NewEncoder(os.Stdout).Encode(conf.PrevResult)
}
