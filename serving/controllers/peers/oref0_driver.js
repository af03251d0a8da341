#!/usr/bin/env node
// glucast's driver for OpenAPS oref0 (MIT; https://github.com/openaps/oref0), run as
//
//     TZ=UTC node oref0_driver.js <path to node_modules/oref0>
//
// One JSON request per line on stdin, one JSON answer per line on stdout (same order).
// Each request is one decision of a real oref0 rig, done with oref0's own library code in
// the order its command-line tools run (bin/oref0-calculate-iob.js, bin/oref0-meal.js,
// bin/oref0-determine-basal.js):
//
//   profile  = lib/profile's defaults() overridden by request.profile
//   iob      = lib/iob({history: pump history newest first, profile, clock, autosens})
//   meal     = lib/meal({history, carbs, profile, basalprofile, clock, glucose})
//              (and, as bin/oref0-meal.js does, COB 0 with fewer than 36 glucose readings)
//   status   = lib/glucose-get-last(glucose newest first)
//   suggest  = lib/determine-basal(status, currenttemp, iob, profile, autosens, meal,
//                                  lib/basal-set-temp, microBolusAllowed, reservoir, clock)
//
// Nothing of oref0 is re-implemented here: this file only moves JSON in and out. oref0 logs
// generously with console.error; that goes to stderr (glucast keeps the last lines), and
// console.log is sent there too so that stdout carries nothing but answers.
'use strict';

var path = require('path');

var oref0Dir = process.argv[2];
if (!oref0Dir) {
    process.stderr.write('usage: node oref0_driver.js <path to node_modules/oref0>\n');
    process.exit(2);
}
var out = process.stdout.write.bind(process.stdout);
console.log = function () { console.error.apply(console, arguments); };
var quiet = process.env.GLUCAST_PEER_QUIET !== '0';
if (quiet) {
    // determine-basal writes dozens of lines a decision; writing them costs more than deciding
    console.error = function () {};
}

var lib = function (p) { return require(path.join(oref0Dir, 'lib', p)); };
var version = require(path.join(oref0Dir, 'package.json')).version;
var profileDefaults = lib('profile').defaults;
var generateIob = lib('iob');
var generateMeal = lib('meal');
var getLastGlucose = lib('glucose-get-last');
var determineBasal = lib('determine-basal/determine-basal');
var tempBasalFunctions = lib('basal-set-temp');

function decide(req) {
    var profile = Object.assign(profileDefaults(), req.profile);
    var autosens = req.autosens || { ratio: 1.0 };
    // lib/iob and lib/meal tag their records in place: give each its own copy
    var copy = function (x) { return JSON.parse(JSON.stringify(x)); };
    var iob = generateIob({
        history: copy(req.pumphistory),
        history24: null,
        profile: profile,
        clock: req.clock,
        autosens: autosens
    });
    var meal = generateMeal({
        history: copy(req.pumphistory),
        profile: profile,
        basalprofile: copy(req.basalprofile),
        clock: req.clock,
        carbs: copy(req.carbhistory),
        glucose: copy(req.glucose)
    });
    if (req.glucose.length < 36) { // bin/oref0-meal.js
        meal.mealCOB = 0;
        meal.reason = 'not enough glucose data to calculate carb absorption';
    }
    var status = getLastGlucose(copy(req.glucose));
    var suggested = determineBasal(
        status, req.currenttemp, iob, profile, autosens, meal, tempBasalFunctions,
        req.microBolusAllowed === true, req.reservoir === undefined ? null : req.reservoir,
        new Date(req.clock)
    );
    if (suggested.error !== undefined) {
        throw new Error('determine-basal: ' + suggested.error);
    }
    return { iob: iob[0], meal: meal, glucose_status: status, suggested: suggested };
}

var buffer = '';
function handle(line) {
    if (!line.trim()) { return; }
    var id = null;
    try {
        var req = JSON.parse(line);
        id = req.id;
        out(JSON.stringify({ id: id, ok: true, result: decide(req) }) + '\n');
    } catch (e) {
        out(JSON.stringify({ id: id, ok: false, error: String(e && e.stack || e) }) + '\n');
    }
}
process.stdin.setEncoding('utf8');
process.stdin.on('data', function (chunk) {
    buffer += chunk;
    var nl;
    while ((nl = buffer.indexOf('\n')) >= 0) {
        var line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        handle(line);
    }
});
process.stdin.on('end', function () { handle(buffer); process.exit(0); });
out(JSON.stringify({ ready: true, peer: 'oref0', version: version, tz: process.env.TZ || '',
                     node: process.version }) + '\n');
